# Builder: Rust toolchain plus cmake for Pingora's zlib-ng.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG TASKCLUSTER_PROXY_REVISION=""
ENV TASKCLUSTER_PROXY_REVISION=${TASKCLUSTER_PROXY_REVISION}
RUN cargo build --release --locked --bin taskcluster-proxy

# Runtime: minimal Debian with CA roots; runs as an unprivileged user on port 80 like the Go image.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libcap2-bin \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin proxy
COPY --from=build /src/target/release/taskcluster-proxy /usr/local/bin/taskcluster-proxy
RUN setcap cap_net_bind_service=+ep /usr/local/bin/taskcluster-proxy
USER proxy
EXPOSE 80
# Later --port arguments override this one.
ENTRYPOINT ["/usr/local/bin/taskcluster-proxy", "--port", "80"]
