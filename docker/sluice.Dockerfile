# The `sluice` image: the static `sluice` binary (x86_64-unknown-linux-musl) and the queue-proxy filter.
# Build context: a folder holding `sluice` and `queue-proxy.wasm` (scripts/images makes it).
#
#   docker build -f docker/sluice.Dockerfile -t sluice/sluice:dev CONTEXT
#
# BASE is a build argument so a base with CA certificates or a shell can be swapped in; the binary is
# static and needs nothing from it.
ARG BASE=scratch
FROM ${BASE}
COPY sluice /usr/local/bin/sluice
COPY queue-proxy.wasm /usr/local/share/sluice/queue-proxy.wasm
# Where `sluice` looks for the filter first.
ENV SLUICE_QUEUE_PROXY_WASM=/usr/local/share/sluice/queue-proxy.wasm
# Non-root, numeric so Kubernetes' runAsNonRoot can check it without an /etc/passwd.
USER 65532:65532
EXPOSE 18000 9090
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["--help"]
