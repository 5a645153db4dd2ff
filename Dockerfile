# syntax=docker/dockerfile:1
#
# ChatConnect in a container:
#   docker build -t chatconnect .
#   docker run -d --name chat -p 8000:8000 -v chatconnect-data:/data chatconnect
#
# It needs BuildKit (docker buildx, the default builder since Docker 23;
# podman and buildah also read it) for the cache mounts below. It sits at the
# repository root because the build context is the whole tree and Docker
# reads .dockerignore from the context's root.
#
# Settings are environment variables (README.md, "Configuration"):
# docker run -e AUTH_MODE=token ... . The SQLite database and the token
# secret live in the /data volume (a bind-mounted host directory must be
# writable by UID 10001).

# --- build: the whole toolchain, thrown away afterwards ---
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep downloaded crates and compiled dependencies between
# builds (BuildKit), so a source change rebuilds only this crate. target/ is
# a cache mount, so the binary is copied out of it within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin chatserver \
    && install -m 0755 target/release/chatserver /usr/local/bin/chatserver

# --- run: the binary, CA certificates and an unprivileged user ---
# Debian slim (the build stage's release, so the same glibc) rather than
# distroless cc: it has bash, which the health check below uses instead of
# adding curl, and a shell to look around with. ca-certificates: the MongoDB
# driver brings its own roots, the system ones are for a tlsCAFile and the
# like.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin chatconnect \
    && install -d -o chatconnect -g chatconnect -m 0700 /data
COPY --from=build /usr/local/bin/chatserver /usr/local/bin/chatserver

ENV HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/data
VOLUME /data
EXPOSE 8000
USER chatconnect

# Liveness without curl in the image: bash's /dev/tcp sends GET /healthz
# and the status line must say 200. /healthz, not /readyz: an unreachable
# MongoDB is not cured by restarting this container.
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PORT:-8000} && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -c 12 <&3 | grep -q ' 200'"]

# SIGTERM (docker stop) drains within SHUTDOWN_TIMEOUT (5s), under
# docker stop's 10s before SIGKILL.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/chatserver"]
