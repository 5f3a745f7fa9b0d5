# Candela: multi-stage build. The builder compiles with cargo caches mounted (fast rebuilds);
# the runtime is slim Debian with the binary, a non-root user and a volume for downloaded models.
FROM docker.io/library/rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares the kernel benchmark; cargo wants its file even when not building it.
COPY benches ./benches
COPY models/stories260K ./models/stories260K
# No debug info in the shipped binary: a quarter of the size.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=true
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin candela \
    && cp target/release/candela /usr/local/bin/candela

FROM docker.io/library/debian:bookworm-slim
# ca-certificates is left unpinned on purpose: it should track Debian's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --home-dir /home/candela --uid 10001 candela \
    && mkdir -p /data/huggingface \
    && chown -R candela /data
COPY --from=builder /usr/local/bin/candela /usr/local/bin/candela
COPY config/container.toml /etc/candela/config.toml
ENV HF_HOME=/data/huggingface \
    RUST_LOG=info
VOLUME ["/data"]
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["candela", "probe", "--url", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["candela", "serve", "--host", "0.0.0.0", "--config", "/etc/candela/config.toml"]
