# The queue-proxy filter as an OCI wasm image in Istio's layout (the "compat" variant Istio's agent
# pulls for a WasmPlugin `url: oci://...`): FROM scratch, one layer holding /plugin.wasm.
# Build context: a folder holding `plugin.wasm` (scripts/images copies the filter built by
# scripts/setup there).
#
#   docker build -f docker/queue-proxy-wasm.Dockerfile -t sluice/queue-proxy-wasm:dev CONTEXT
FROM scratch
COPY plugin.wasm ./
