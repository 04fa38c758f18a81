# syntax=docker/dockerfile:1
#
# One build of the workspace, one small image per service:
#   docker build --target order-generator -t order-generator .
#   docker build --target order-processor -t order-processor .
#   docker build --target dlq-analyzer    -t dlq-analyzer .
#
# Dependencies are compiled in a layer of their own (cargo-chef), so a change to our code
# rebuilds only our crates. The runtime images are distroless (glibc, no shell, no package
# manager), run as a non-root user, and carry only the shared libraries the binaries link.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS chef
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# the build's Debian packages, from the one list that .ci/run installs too (compilers and CMake
# for librdkafka, TLS, zlib and curl headers; its SASL PLAIN, SCRAM and OAUTHBEARER are built in)
COPY scripts/debian-build-packages.txt /tmp/
RUN apt-get update \
 && sed -e 's/#.*//' /tmp/debian-build-packages.txt | xargs apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
COPY --from=planner /src/recipe.json recipe.json
# the build settings (jemalloc's options) must be there when the dependencies are compiled
COPY .cargo .cargo
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
# then collect the shared libraries the binaries need beyond glibc (OpenSSL, zlib, libgcc)
RUN cargo build --release --locked -p order-generator -p order-processor -p dlq-analyzer \
 && mkdir -p /out/bin /out/libs \
 && cp target/release/order-generator target/release/order-processor target/release/dlq-analyzer /out/bin/ \
 && for b in /out/bin/*; do ldd "$b"; done \
    | awk '/=> \// { print $3 }' | sort -u \
    | grep -v -E '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' \
    | xargs -r -I{} cp -L --parents {} /out/libs/

FROM gcr.io/distroless/base-nossl-debian12:nonroot AS runtime
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
