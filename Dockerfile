# Strata as a container / storage sidecar.
# Stage 1 builds with the same scripts CI runs; stage 2 is a slim runtime.
FROM debian:12 AS build
WORKDIR /src
COPY . /src
RUN bash .ci/install-deps build \
 && bash .ci/build /src/build-release -DSTRATA_TESTS=OFF \
 && strip /src/build-release/strata

FROM debian:12-slim
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends libspdlog1.10 libfmt9 libzstd1 zlib1g libgnutls30 libcpp-httplib0.11 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd -g 10809 strata && useradd -u 10809 -g strata -d /images -s /usr/sbin/nologin strata \
 && mkdir -p /images /etc/strata /run/strata && chown strata:strata /images /run/strata
COPY --from=build /src/build-release/strata /usr/local/bin/strata
COPY server/container/entrypoint.sh /usr/local/bin/strata-entrypoint
COPY server/container/healthcheck.sh /usr/local/bin/strata-healthcheck
COPY config/examples/container.json /usr/share/strata/container.json
USER strata
VOLUME ["/images"]
EXPOSE 10809
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s CMD ["strata-healthcheck"]
ENTRYPOINT ["strata-entrypoint"]
