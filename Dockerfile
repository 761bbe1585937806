# Build stage: the release binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

# Final stage: the binary, the shipped config, a non-root user.
FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/keygate --create-home keygate
COPY --from=build /src/target/release/keygate /usr/local/bin/keygate
COPY config /etc/keygate
USER keygate
WORKDIR /var/lib/keygate
EXPOSE 8080 9901
ENTRYPOINT ["keygate"]
CMD ["serve", "-c", "/etc/keygate/keygate.yaml"]
