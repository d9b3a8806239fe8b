# redfuse container image.
#
#   docker build --build-arg GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t redfuse .
#   docker run --rm -p 6380:6380 -p 9380:9380 -e REDFUSE_UPSTREAM=redis.internal:6379 redfuse
#
# Build stage: the dependencies are compiled in a layer of their own (only Cargo.toml and
# Cargo.lock are copied first, with stand-in sources), so a change under src/ rebuilds only
# redfuse itself. The `image` profile (Cargo.toml) is release without debug info, stripped.
# The Debian release matches the runtime image's, so the binary finds the glibc it was linked
# against.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
# The build context has no .git: the commit for redfuse_build_info comes from here.
ARG GIT_COMMIT=unknown
ENV GIT_COMMIT=${GIT_COMMIT}
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --profile image --locked \
    && rm -rf src
COPY src ./src
# COPY keeps the files' modification times, which may be older than the stand-in build:
# touching the crate roots makes cargo rebuild redfuse over it.
RUN touch src/main.rs src/lib.rs \
    && cargo build --profile image --locked \
    && ./target/image/redfuse --version

# Runtime: distroless "cc" has glibc and libgcc and nothing else (no shell, no package
# manager). Its "nonroot" user is uid/gid 65532; USER is numeric so that Kubernetes'
# runAsNonRoot can verify it without reading /etc/passwd.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="redfuse" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
COPY --from=build /src/target/image/redfuse /usr/local/bin/redfuse
COPY deploy/docker/redfuse.toml /etc/redfuse/redfuse.toml
# Inside a container redfuse must listen on all interfaces to be reachable through published
# ports. A pod overrides REDFUSE_LISTEN with 127.0.0.1:6380: the app reaches its sidecar over
# localhost, while the admin port stays on 0.0.0.0 for the kubelet's probes and Prometheus.
ENV REDFUSE_CONFIG=/etc/redfuse/redfuse.toml \
    REDFUSE_LISTEN=0.0.0.0:6380 \
    REDFUSE_ADMIN_LISTEN=0.0.0.0:9380
USER 65532:65532
EXPOSE 6380 9380
# SIGTERM: stop accepting, drain in-flight replies within shutdown_timeout_ms (10 s), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/redfuse"]
