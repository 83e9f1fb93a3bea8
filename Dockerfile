# botvisor in a container. Build: docker build -t botvisor .
# Run:   docker run -d -p 8000:8000 -v botvisor-data:/data -e API_KEY=... botvisor
# (sessions, credentials and backups live in the /data volume).

# --- build -------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The release binary only: never the test-peer feature (it turns certificate checks off).
RUN cargo build --release --locked --bin botvisor \
 && install -m 0755 target/release/botvisor /usr/local/bin/botvisor

# --- run ---------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin botvisor \
 && mkdir -p /data && chown botvisor:botvisor /data && chmod 0700 /data
COPY --from=build /usr/local/bin/botvisor /usr/local/bin/botvisor
USER botvisor
ENV BOTVISOR_DATA_DIR=/data \
    BOTVISOR_BIND=0.0.0.0 \
    PORT=8000 \
    BOTVISOR_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 8000
# SIGTERM drains requests and stops every session within --shutdown-timeout.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/botvisor", "health", "--url", "http://127.0.0.1:8000/healthz"]
ENTRYPOINT ["/usr/local/bin/botvisor"]
CMD ["serve"]
