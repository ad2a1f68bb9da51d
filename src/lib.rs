//! Quiver: a distributed SQL query engine built on Apache DataFusion and Arrow Flight.
//!
//! The crate is split into concepts with one-way dependencies:
//! `auth`, `storage` → `planner` → `protocol` → `transport` → `coordinator` / `worker` → `web` → `cluster`, `client` →
//! `cli`, the binary. The planner turns a DataFusion physical plan into Stages and Tasks and knows
//! nothing of the network; the protocol names the messages; only the transport speaks gRPC.

pub mod config;
pub mod planner;
pub mod protocol;
pub mod auth;
pub mod storage;
pub mod transport;
pub mod coordinator;
pub mod worker;
pub mod web;
pub mod cluster;
pub mod client;
pub mod cli;
pub mod tpch;
pub mod bench;
pub mod format;
pub mod settings;
