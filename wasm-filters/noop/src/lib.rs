//! A proxy-wasm HTTP filter that does nothing: every stream gets a context and every callback the Rust
//! SDK's defaults (continue). What it costs Envoy is the floor for any proxy-wasm filter in V8, the
//! reference `scripts/bench-queue-proxy` measures the queue-proxy filter against.

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{ContextType, LogLevel};

    struct Root;

    impl Context for Root {}

    impl RootContext for Root {
        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Stream))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Stream;

    impl Context for Stream {}

    impl HttpContext for Stream {}

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| Box::new(Root));
    }}
}
