//! barrage-load: a density load generator for barrage (and any WebSocket gateway with the
//! same rooms API). It holds up to millions of loopback WebSocket connections from one
//! process: io_uring rings whose direct-descriptor tables hold the sockets (no process fd per
//! connection), many 127.x source addresses with explicit ports, and 24 bytes of state per
//! connection.
//!
//! Data flow: `scenario_connect` (main thread: phases, sampling, API) steers `worker`s (one
//! loop per thread) → `ring` (io_uring: connect chains, polls, receives, pings) → `conn`
//! (per-connection state) → `handshake` / `frames` (the bytes read, counted) → `errors`,
//! `probe` (/proc and the gateway API) → `report` (summary and JSON).
//!
//! `scenario_soak` ramps through the same workers with a churn plan (`churn`: victims, source
//! pairs, close deadlines) and publishes through `fanout_pub`'s HTTP client, sampling the
//! gateway and the kernel into a TSV.
//!
//! `scenario_upgrade` follows clients through a zero-downtime upgrade: the same workers, with
//! `upgrade_recv` as their reads (`fanout_read` → `upgrade_walk`: seqs, backfills, reconnect
//! frames → `upgrade_follow`: the README's client algorithm) and `reopen` bringing clients back
//! with `after=last`; `upgrade_pub` publishes with retries, `upgrade_gaps` short-polls gaps.
//!
//! `scenario_ingest` measures the business API's intake alone: keep-alive connections sending
//! single, batched and NDJSON publishes back to back.
//!
//! `scenario_fanout` subscribes through the same workers, with `fanout_recv` as their reads
//! (`fanout_read` → `pbwalk`: messages out of frames, without copies), while `fanout_pub`
//! threads publish `fanout_msg` messages; `fanout_book` is what they share, `fanout_report`
//! what is left.
#![deny(clippy::undocumented_unsafe_blocks)]

mod addrs;
mod churn;
mod conn;
mod errors;
mod fanout_book;
mod fanout_msg;
mod fanout_pub;
mod fanout_read;
mod fanout_recv;
mod fanout_report;
mod frames;
mod handshake;
mod pace;
mod pbwalk;
mod probe;
mod reopen;
mod report;
mod ring;
mod scenario_connect;
mod scenario_fanout;
mod scenario_hold;
mod scenario_ingest;
mod scenario_sends;
mod scenario_soak;
mod scenario_upgrade;
mod sys;
mod upgrade_follow;
mod upgrade_gaps;
mod upgrade_pub;
mod upgrade_recv;
mod upgrade_walk;
mod worker;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "barrage-load", version, about = "Density load generator for barrage (loopback only)")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Open N connections into R rooms at a set rate, hold them, check each receives a block,
    /// and report connection rate and memory per connection. Exit 0 only if all N were held
    /// and joined and none missed the probe block; 1 otherwise; 2 for refused arguments.
    Connect(Box<scenario_connect::ConnectArgs>),
    /// Subscribe M members into R rooms, publish messages (paced, or as fast as each room's
    /// first member takes them), and report deliveries and frames per second, losses, latency
    /// to each member and to the last, and the server's CPU per million deliveries. Exit 0 if
    /// everyone subscribed and nothing was lost (or, for barrage, only what its drop counters
    /// account for); 1 otherwise; 2 for refused arguments.
    Fanout(Box<scenario_fanout::FanoutArgs>),
    /// Ramp N connections into R rooms, then for a while close and reopen (same room) a set
    /// number of random ones a second while publishing through the business API, sampling the
    /// gateway's memory and counters and the kernel's TCP memory into a TSV. Exit 0 if everyone
    /// joined, no reconnect failed, the churn reached its rate and the gateway's online counts
    /// matched at the end; 1 otherwise; 2 for refused arguments.
    Soak(Box<scenario_soak::SoakArgs>),
    /// Hold N clients into R rooms of the running gateway while publishing through the API,
    /// start a new gateway that takes it over (--takeover), follow every client through the
    /// drain (reconnect frames, resume with after=last, duplicates and gaps counted, gaps short
    /// polled), then check each reached its room's last seq. Reports drain time, reconnects per
    /// second, both processes' peak RSS, messages lost. Exit 0 if nothing was lost, everyone
    /// caught up and the old process exited; 1 otherwise; 2 for refused arguments.
    Upgrade(Box<scenario_upgrade::UpgradeArgs>),
    /// Send publishes to the business API over K keep-alive connections for a while — one per
    /// request, protobuf batches of B, or NDJSON of B — and report messages accepted per second
    /// and the gateway's CPU per message. Exit 0 if messages were accepted and no request
    /// failed; 1 otherwise; 2 for refused arguments.
    Ingest(Box<scenario_ingest::IngestArgs>),
    /// Signed-in clients send chat lines with ids, one in flight each, for a while; report
    /// acked sends per second, send-to-ack latency (p50/p99) and the gateway's CPU per send
    /// (with and without a send hook: bench/hooks.sh). Exit 0 if sends were acked and no client
    /// failed; 1 otherwise; 2 for refused arguments.
    Sends(Box<scenario_sends::SendsArgs>),
    /// Hold N idle members of one room over ws:// or wss:// (--ca) from one source address,
    /// opened a few hundred at a time; prints the join rate once all joined, then holds them.
    /// Exit 0 if all joined; 1 otherwise; 2 for refused arguments.
    Hold(Box<scenario_hold::HoldArgs>),
    /// A trivial business-hook backend that allows every call (JSON, keep-alive), for
    /// bench/hooks.sh. Runs until killed.
    Backend(scenario_sends::BackendArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.scenario {
        Scenario::Connect(args) => scenario_connect::run(*args),
        Scenario::Fanout(args) => scenario_fanout::run(*args),
        Scenario::Soak(args) => scenario_soak::run(*args),
        Scenario::Upgrade(args) => scenario_upgrade::run(*args),
        Scenario::Ingest(args) => scenario_ingest::run(*args),
        Scenario::Sends(args) => scenario_sends::run(*args),
        Scenario::Hold(args) => scenario_hold::run(*args),
        Scenario::Backend(args) => scenario_sends::backend(args),
    };
    std::process::exit(code);
}
