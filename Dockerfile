# Strata as a container / storage sidecar (docs/CONTAINER.md).
# Stage 1 builds with the same scripts CI runs; stage 2 is a slim runtime.
# Build with `podman build --format docker` (podman's default OCI format
# drops HEALTHCHECK) or `docker build`.
FROM debian:12 AS build
WORKDIR /src
# Dependencies first, in their own layer: a source change does not
# reinstall them.
COPY .ci/install-deps /src/.ci/install-deps
RUN bash .ci/install-deps build
COPY CMakeLists.txt /src/
COPY .ci/build /src/.ci/build
COPY protocol /src/protocol
COPY formats /src/formats
COPY config /src/config
# The sources only: the container scripts in server/container/ are not
# compiled, and changing them must not rebuild the binary.
COPY server/*.cpp server/*.h /src/server/
RUN bash .ci/build /src/build-release -DSTRATA_TESTS=OFF \
 && strip /src/build-release/strata

FROM debian:12-slim
# apt's package lists and caches (77 MB) are of no use at run time.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends libspdlog1.10 libfmt9 libzstd1 zlib1g libgnutls30 libcpp-httplib0.11 liburing2 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
 && groupadd -g 10809 strata && useradd -u 10809 -g strata -d /images -s /usr/sbin/nologin strata \
 && mkdir -p /images /etc/strata /run/strata && chown strata:strata /images /run/strata
COPY --from=build /src/build-release/strata /usr/local/bin/strata
COPY server/container/entrypoint.sh /usr/local/bin/strata-entrypoint
COPY server/container/healthcheck.sh /usr/local/bin/strata-healthcheck
COPY config/examples/container.json /usr/share/strata/container.json
# Where the entry point puts the HTTP endpoint (metrics and probes) and where
# the healthcheck asks /healthz; empty: the config's own "http" is used and
# the healthcheck asks 127.0.0.1:STRATA_HEALTH_PORT.
ENV STRATA_HTTP=0.0.0.0:10810
USER strata
VOLUME ["/images"]
EXPOSE 10809 10810
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s CMD ["strata-healthcheck"]
ENTRYPOINT ["strata-entrypoint"]
