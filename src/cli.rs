//! The command line: `serve` (the default) runs the gateway; `token` mints a client token for
//! trying things out. Flags and `BARRAGE_*` env vars override the TOML file, which overrides
//! the embedded defaults.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::{Config, Overrides};
use crate::gateway::Gateway;

#[derive(Parser, Debug)]
#[command(name = "barrage", version, about = "io_uring WebSocket message edge for live rooms")]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `barrage [FLAGS]` is `barrage serve [FLAGS]`.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default).
    Serve(Box<ServeArgs>),
    /// Print an HS256 client token (JWT) for a user.
    Token(TokenArgs),
    /// Check this host for N connections: limits, sysctls, memory, kernel. Exits 1 if short.
    Doctor(DoctorArgs),
}

#[derive(Args, Debug)]
struct DoctorArgs {
    /// Connections to plan for.
    #[arg(long, default_value_t = 1_000_000)]
    connections: u64,
    /// A load generator on this host holds the other end of every connection.
    #[arg(long)]
    with_loadgen: bool,
    /// Also check the Redis that durable state would use (redis.url).
    #[arg(long, env = "BARRAGE_REDIS")]
    redis: Option<String>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML config file; flags and env vars override its values.
    #[arg(long, short = 'c', env = "BARRAGE_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Replace the barrage serving upgrade.control_socket without dropping anything: take its
    /// listeners and rooms, then have it drain its clients into this process (with none
    /// there, start fresh).
    #[arg(long)]
    takeover: bool,
    #[command(flatten)]
    overrides: Overrides,
}

#[derive(Args, Debug)]
struct TokenArgs {
    /// The HS256 secret (the gateway's auth.jwt_secret).
    #[arg(long, env = "BARRAGE_JWT_SECRET")]
    secret: String,
    /// User id (the `sub` claim).
    #[arg(long)]
    user: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_s: u64,
    /// Make a token that may only watch (claim `send: false`).
    #[arg(long)]
    no_send: bool,
    /// Moderation rights (claim `admin: true`) in the rooms given with --rooms.
    #[arg(long)]
    admin: bool,
    /// Attribute rights (claim `attrs: true`) in the rooms given with --rooms.
    #[arg(long)]
    attrs: bool,
    /// Rooms the admin and attribute rights reach (claim `rooms`; `*` = all), comma-separated.
    #[arg(long, value_delimiter = ',')]
    rooms: Vec<String>,
    /// Message types this user may send beyond the client types (claim `types`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    types: Vec<String>,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(*args),
        Some(Command::Token(args)) => token(&args),
        Some(Command::Doctor(args)) => return doctor(&args),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("barrage: {e}");
            1
        }
    }
}

fn load(args: &ServeArgs) -> Result<Config, Box<dyn std::error::Error>> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
            Config::from_toml(&text)?
        }
        None => Config::default(),
    };
    config.apply(&args.overrides);
    // wss's customary port when TLS is on and the listener was left at its default.
    if !config.tls.cert.is_empty()
        && args.overrides.listen.is_none()
        && config.server.listen == Config::default().server.listen
    {
        config.server.listen.set_port(8443);
    }
    config.validate()?;
    Ok(config)
}

fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = load(&args)?;
    if args.print_config {
        print!("{}", toml::to_string(&config)?);
        return Ok(());
    }
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let mut gateway = if args.takeover { Gateway::take_over(&config)? } else { Gateway::start(&config)? };
    println!(
        "barrage {}: {} shards, {} direct descriptors per ring",
        env!("CARGO_PKG_VERSION"),
        gateway.shard_count,
        gateway.ring_files_max
    );
    let scheme = if config.tls.cert.is_empty() { "ws" } else { "wss" };
    println!("  WebSocket  {scheme}://{}/ws  (subprotocols barrage.v1.proto, barrage.v1.json)", gateway.public_addr);
    match &gateway.kernel_tls {
        Some(Ok(())) => println!(
            "  TLS        sends sealed by the kernel (kernel TLS; a connection it refuses is sealed in user space), records received in user space"
        ),
        Some(Err(why)) => println!("  TLS        records sealed in user space; kernel TLS: {why}"),
        None => {}
    }
    println!("  API        http://{}  (POST /v1/rooms/ROOM/messages, GET /metrics)", gateway.api_addr);
    if !config.websocket.echo_path.is_empty() {
        println!("  Echo       ws://{}{}", gateway.public_addr, config.websocket.echo_path);
    }
    loop {
        if let Some(sig) = signals.pending().next() {
            if sig == SIGHUP {
                // New certificates for new handshakes; nothing else reloads.
                match gateway.reload_tls() {
                    Ok(()) => println!("barrage: SIGHUP: TLS certificates reloaded"),
                    Err(e) => eprintln!("barrage: SIGHUP: {e}; keeping the current certificates"),
                }
                continue;
            }
            if config.drain.on_sigterm && sig == SIGTERM && !gateway.handed_over() {
                gateway.drain();
                wait_drained(&gateway, &mut signals, config.drain.deadline_ms, "SIGTERM, draining");
            } else {
                println!("barrage: signal {sig}, closing connections");
            }
            break;
        }
        if gateway.handed_over() {
            // The drain's deadline is the new process's [drain] one, at most the old's.
            let deadline = config.drain.deadline_ms;
            wait_drained(&gateway, &mut signals, deadline, "upgraded, draining into the new process");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    gateway.stop();
    println!("barrage: stopped");
    Ok(())
}

/// A drain under way (SIGTERM, or an upgrade: every pending message delivered, clients sent
/// elsewhere in waves): returns once every connection is gone, at the deadline, or at a
/// second signal (other than SIGHUP).
fn wait_drained(gateway: &Gateway, signals: &mut Signals, deadline_ms: u64, why: &str) {
    println!("barrage: {why} (a second SIGTERM stops at once)");
    // Past the shards' own deadline they close what is left; this only bounds the wait.
    let until = std::time::Instant::now() + std::time::Duration::from_millis(deadline_ms.saturating_add(5_000));
    loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        // SIGHUP (certificates) is not a reason to stop a drain.
        if signals.pending().any(|s| s != SIGHUP) {
            println!("barrage: second signal, stopping");
            return;
        }
        let progress = gateway.drain_progress();
        if progress.done() || std::time::Instant::now() >= until {
            println!("barrage: drained ({} reconnects sent)", progress.reconnects);
            return;
        }
    }
}

fn doctor(args: &DoctorArgs) -> i32 {
    let plan = crate::doctor::Plan { connections: args.connections, with_loadgen: args.with_loadgen };
    let mut findings = crate::doctor::diagnose(&crate::doctor::HostFacts::read(), plan);
    if let Some(url) = args.redis.as_deref().filter(|u| !u.is_empty()) {
        let facts = crate::doctor::RedisFacts::read(url, std::time::Duration::from_secs(2));
        findings.extend(crate::doctor::diagnose_redis(&facts));
    }
    let (text, ok) = crate::doctor::render(&findings, plan);
    print!("{text}");
    if ok { 0 } else { 1 }
}

fn token(args: &TokenArgs) -> Result<(), Box<dyn std::error::Error>> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut claims = serde_json::json!({"sub": args.user, "exp": now + args.ttl_s, "send": !args.no_send});
    for (set, claim) in [(args.admin, "admin"), (args.attrs, "attrs")] {
        if set {
            claims[claim] = true.into();
        }
    }
    for (list, claim) in [(&args.rooms, "rooms"), (&args.types, "types")] {
        if !list.is_empty() {
            claims[claim] = serde_json::json!(list);
        }
    }
    println!("{}", crate::auth::sign_hs256(args.secret.as_bytes(), &claims));
    Ok(())
}
