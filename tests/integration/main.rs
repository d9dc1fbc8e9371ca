//! warden's integration tests: one binary, one module per area.

mod check;
mod demo;
mod drain;
mod gateway;
mod grpc;
mod harness;
mod hostile;
mod jwt;
mod lattice;
mod mutation;
mod parity;
mod paths;
mod proxy;
mod reload;
mod rotation;
mod vectors;
mod websocket;
