# syntax=docker/dockerfile:1
# The authgres image: a stripped release binary on a distroless base, run
# as a non-root user. Build from the repository root:
#   docker build -t authgres:0.1.0 .
# Mount proxy.toml and the secrets file at /etc/authgres (docs/deploy.md).

FROM rust:1.95-bookworm AS build
# aws-lc-rs (rustls' crypto) builds with the C compiler the image has;
# cmake covers its configurations that want it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Symbols stripped (the release profile keeps line tables for backtraces:
# 84 MB unstripped); the registry and target cached between builds.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin authgres \
 && cp target/release/authgres /authgres

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /authgres /usr/local/bin/authgres
# distroless' nonroot user (65532); the process needs no privilege.
USER nonroot:nonroot
# Postgres protocol (TLS by SSLRequest or direct), HTTPS /sql, admin.
EXPOSE 6432 8432 9432
ENTRYPOINT ["/usr/local/bin/authgres"]
CMD ["serve", "--config", "/etc/authgres/proxy.toml"]
