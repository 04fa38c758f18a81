# One build of the workspace, one small image per service:
#   docker build --target order-generator -t order-generator .
#   docker build --target order-processor -t order-processor .
#   docker build --target dlq-analyzer    -t dlq-analyzer .
#
# Dependencies are compiled in a layer of their own (cargo-chef), so a change to our code
# rebuilds only our crates. The runtime images are distroless (glibc, no shell, no package
# manager), run as a non-root user, and carry only the shared libraries the binaries link.
#
# The base images are build arguments whose defaults are the official ones. `make images`
# builds on bases made locally from Debian's packages instead (scripts/engine.sh), and passes
# its machine's CA bundle to the cargo steps as the build secret `build-ca`; without that
# secret the image's own CA certificates are used. No BuildKit frontend image is needed: this
# file uses only what the engine's built-in Dockerfile frontend knows.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm
ARG BUILDER_IMAGE=rust:${RUST_VERSION}-slim-${DEBIAN}
ARG RUNTIME_IMAGE=gcr.io/distroless/base-nossl-debian12:nonroot

FROM ${BUILDER_IMAGE} AS chef
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# the build's Debian packages, from the one list that .ci/run installs too (compilers and CMake
# for librdkafka, TLS, zlib and curl headers; its SASL PLAIN, SCRAM and OAUTHBEARER are built in)
COPY scripts/debian-build-packages.txt /tmp/
RUN apt-get update \
 && sed -e 's/#.*//' /tmp/debian-build-packages.txt | xargs apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/*
# cargo's HTTPS verified with the `build-ca` secret when one is given, else with the image's CAs
RUN printf '%s\n' '#!/bin/sh' \
      'if [ -s /run/secrets/build-ca ]; then' \
      '  export CARGO_HTTP_CAINFO=/run/secrets/build-ca SSL_CERT_FILE=/run/secrets/build-ca' \
      'fi' \
      'exec "$@"' >/usr/local/bin/with-build-ca \
 && chmod 755 /usr/local/bin/with-build-ca
RUN --mount=type=secret,id=build-ca with-build-ca cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
COPY --from=planner /src/recipe.json recipe.json
# the build settings (jemalloc's options) must be there when the dependencies are compiled
COPY .cargo .cargo
RUN --mount=type=secret,id=build-ca with-build-ca cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
# then collect the shared libraries the binaries need beyond glibc (OpenSSL, zlib, libgcc), flat
# into the multiarch directory that the loader searches: the same path on a merged-/usr base
# (/lib a link to usr/lib) and on one that is not, so copying them never replaces a link.
# The pipe runs under the chef stage's SHELL (bash -o pipefail), which this stage inherits.
# hadolint ignore=DL4006
RUN --mount=type=secret,id=build-ca with-build-ca \
      cargo build --release --locked -p order-generator -p order-processor -p dlq-analyzer \
 && libdir=/out/libs/usr/lib/$(gcc -print-multiarch) \
 && mkdir -p /out/bin "$libdir" \
 && cp target/release/order-generator target/release/order-processor target/release/dlq-analyzer /out/bin/ \
 && for b in /out/bin/*; do ldd "$b"; done \
    | awk '/=> \// { print $3 }' | sort -u \
    | grep -v -E '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' \
    | xargs -r -I{} cp -L {} "$libdir/"

FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=builder /out/libs/ /
USER 65532:65532
ENV LOG_FORMAT=json RUST_LOG=info

FROM runtime AS order-generator
COPY --from=builder /out/bin/order-generator /usr/local/bin/order-generator
ENV HTTP_PORT=8101
EXPOSE 8101
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["/usr/local/bin/order-generator", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/order-generator"]

FROM runtime AS order-processor
COPY --from=builder /out/bin/order-processor /usr/local/bin/order-processor
ENV HTTP_PORT=8102
EXPOSE 8102
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["/usr/local/bin/order-processor", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/order-processor"]

FROM runtime AS dlq-analyzer
COPY --from=builder /out/bin/dlq-analyzer /usr/local/bin/dlq-analyzer
ENV HTTP_PORT=8103
EXPOSE 8103
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["/usr/local/bin/dlq-analyzer", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/dlq-analyzer"]
