//! `barrage doctor --connections N`: reads this host (limits, sysctls, memory, kernel) and says
//! what is short of N connections and what to change. The checks are a pure function of the
//! facts, so they are tested without a host; `HostFacts::read` is the only part touching /proc.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

/// Kernel memory per server socket (TCP socket, file, and the armed multishot poll), measured on
/// Linux 6.18 — see bench/RESULTS.md.
pub const KERNEL_BYTES_PER_SOCKET: u64 = 5 * 1024;
/// Gateway user memory per idle joined connection, budget (measured figures in bench/RESULTS.md).
pub const USER_BYTES_PER_CONNECTION: u64 = 128;
/// Listen backlog and SYN queue a connect storm of tens of thousands per second needs.
const BACKLOG_FOR_STORMS: u64 = 65_535;
const NETDEV_BACKLOG_FOR_STORMS: u64 = 16_384;
/// Below this many connections the kernel defaults are fine for the queues.
const STORM_SCALE: u64 = 50_000;

/// What the checks need to know about a host.
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    pub kernel: (u32, u32),
    pub io_uring_disabled: u64,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    pub file_max: u64,
    pub somaxconn: u64,
    pub tcp_max_syn_backlog: u64,
    pub netdev_max_backlog: u64,
    pub port_range: (u64, u64),
    pub mem_available: u64,
    /// tcp_mem's third value, in pages.
    pub tcp_mem_max_pages: u64,
}

/// One check's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub check: &'static str,
    pub have: String,
    pub need: String,
    pub ok: bool,
    pub fix: String,
}

/// What is being planned for.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub connections: u64,
    /// A load generator on the same host holds the other end of every connection.
    pub with_loadgen: bool,
}

/// Every check for `plan` on a host with `facts`.
pub fn diagnose(facts: &HostFacts, plan: Plan) -> Vec<Finding> {
    let n = plan.connections;
    let ends = if plan.with_loadgen { 2 } else { 1 };
    let storm = n >= STORM_SCALE;
    let mut out = Vec::new();
    let mut check = |check, have: String, need: String, ok, fix: String| {
        out.push(Finding { check, have, need, ok, fix });
    };
    check(
        "kernel",
        format!("{}.{}", facts.kernel.0, facts.kernel.1),
        ">= 6.1".into(),
        facts.kernel >= (6, 1),
        "multishot accept/receive with direct descriptors and buffer rings need Linux 6.1 or newer".into(),
    );
    check(
        "io_uring enabled",
        facts.io_uring_disabled.to_string(),
        "0".into(),
        facts.io_uring_disabled == 0,
        "sysctl -w kernel.io_uring_disabled=0".into(),
    );
    let table = facts.nofile_hard.saturating_sub(1024).max(1);
    let per_ring = table - u64::from(crate::shard::accept_margin(table.min(u64::from(u32::MAX)) as u32));
    check(
        "RLIMIT_NOFILE (hard)",
        facts.nofile_hard.to_string(),
        ">= 4096".into(),
        facts.nofile_hard >= 4096,
        format!(
            "caps each ring's direct-descriptor table: {} rings of {table} ({per_ring} filled by accepts) for {n} connections; raise with LimitNOFILE= (tuning/barrage.service) or `ulimit -Hn`",
            n.div_ceil(per_ring)
        ),
    );
    let files = n * ends + 65_536;
    check(
        "fs.file-max",
        facts.file_max.to_string(),
        format!(">= {files}"),
        facts.file_max >= files,
        format!("sysctl -w fs.file-max={} (every socket is a file, direct descriptors too)", files.next_power_of_two()),
    );
    let backlog = if storm { BACKLOG_FOR_STORMS } else { 1024 };
    check(
        "net.core.somaxconn",
        facts.somaxconn.to_string(),
        format!(">= {backlog}"),
        facts.somaxconn >= backlog,
        "sysctl -w net.core.somaxconn=262144 (caps every listen backlog; connect storms overflow it)".into(),
    );
    check(
        "net.ipv4.tcp_max_syn_backlog",
        facts.tcp_max_syn_backlog.to_string(),
        format!(">= {backlog}"),
        facts.tcp_max_syn_backlog >= backlog,
        "sysctl -w net.ipv4.tcp_max_syn_backlog=262144".into(),
    );
    let netdev = if storm { NETDEV_BACKLOG_FOR_STORMS } else { 1000 };
    check(
        "net.core.netdev_max_backlog",
        facts.netdev_max_backlog.to_string(),
        format!(">= {netdev}"),
        facts.netdev_max_backlog >= netdev,
        "sysctl -w net.core.netdev_max_backlog=16384".into(),
    );
    let need_mem = n * (KERNEL_BYTES_PER_SOCKET * ends + USER_BYTES_PER_CONNECTION);
    check(
        "memory available",
        gib(facts.mem_available),
        format!(">= {}", gib(need_mem)),
        facts.mem_available >= need_mem,
        format!(
            "about {} KiB of kernel memory per socket ({} per connection) plus {USER_BYTES_PER_CONNECTION} B of gateway memory",
            KERNEL_BYTES_PER_SOCKET / 1024,
            if plan.with_loadgen { "two sockets" } else { "one socket" }
        ),
    );
    let tcp_pages = n * ends / 4; // about a page of buffer per four mostly idle sockets
    check(
        "net.ipv4.tcp_mem (max pages)",
        facts.tcp_mem_max_pages.to_string(),
        format!(">= {tcp_pages}"),
        facts.tcp_mem_max_pages >= tcp_pages,
        "sysctl -w net.ipv4.tcp_mem='786432 2097152 6291456' (over it the stack drops data)".into(),
    );
    if plan.with_loadgen {
        let ports = facts.port_range.1.saturating_sub(facts.port_range.0) + 1;
        check(
            "ephemeral ports",
            format!("{}-{} ({ports})", facts.port_range.0, facts.port_range.1),
            "informational".into(),
            true,
            format!(
                "one source address reaches ~{ports} connections per destination port; a load generator needs {} source addresses (127.x.y.z) with explicit ports",
                n.div_ceil(ports.max(1))
            ),
        );
    }
    out
}

/// What `barrage doctor --redis URL` found at the Redis that `redis.url` names.
#[derive(Debug, Clone)]
pub struct RedisFacts {
    pub url: String,
    /// `redis_version` and `maxmemory-policy`, or why Redis could not be asked.
    pub reached: Result<(String, String), String>,
}

impl RedisFacts {
    /// Connects (within `timeout`), PINGs, and reads the version and the eviction policy.
    pub fn read(url: &str, timeout: std::time::Duration) -> RedisFacts {
        let ask = || -> redis::RedisResult<(String, String)> {
            let mut con = redis::Client::open(url)?.get_connection_with_timeout(timeout)?;
            con.set_read_timeout(Some(timeout))?;
            redis::cmd("PING").exec(&mut con)?;
            let info: String = redis::cmd("INFO").arg("server").query(&mut con)?;
            let version = info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("?").trim().to_owned();
            let policy: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy").query(&mut con)?;
            Ok((version, policy.get(1).cloned().unwrap_or_else(|| "?".into())))
        };
        RedisFacts { url: url.to_owned(), reached: ask().map_err(|e| e.to_string()) }
    }
}

/// The checks of durable state's Redis: reachable, new enough (6.2: `PXAT`, `ZRANGE ...
/// BYSCORE LIMIT`), and not evicting keys it needs (bans, seqs) under memory pressure.
pub fn diagnose_redis(facts: &RedisFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    let (version, policy) = match &facts.reached {
        Ok(v) => v.clone(),
        Err(e) => {
            out.push(Finding {
                check: "redis connection",
                have: e.clone(),
                need: format!("PONG from {}", facts.url),
                ok: false,
                fix: "start redis-server, or fix redis.url (--redis)".into(),
            });
            return out;
        }
    };
    out.push(Finding {
        check: "redis connection",
        have: "PONG".into(),
        need: "PONG".into(),
        ok: true,
        fix: String::new(),
    });
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    let new_enough = parts.first().copied().unwrap_or(0) * 100 + parts.get(1).copied().unwrap_or(0) >= 602;
    out.push(Finding {
        check: "redis version",
        have: version,
        need: ">= 6.2".into(),
        ok: new_enough,
        fix: "install Redis 7 (Debian: apt-get install redis-server)".into(),
    });
    let evicts_anything = policy.starts_with("allkeys");
    out.push(Finding {
        check: "redis maxmemory-policy",
        have: policy,
        need: "noeviction or volatile-*".into(),
        ok: !evicts_anything,
        fix: "CONFIG SET maxmemory-policy noeviction (allkeys-* can evict bans and seq counters)".into(),
    });
    out
}

/// A table of findings; the second value is whether everything is fine.
pub fn render(findings: &[Finding], plan: Plan) -> (String, bool) {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "barrage doctor: {} connections{}",
        plan.connections,
        if plan.with_loadgen { ", load generator on this host" } else { "" }
    );
    for f in findings {
        let mark = if f.ok { "ok   " } else { "SHORT" };
        let _ = writeln!(s, "  [{mark}] {:<30} have {:<22} need {}", f.check, f.have, f.need);
        if !f.ok || f.need == "informational" {
            let _ = writeln!(s, "          {}", f.fix);
        }
    }
    let ok = findings.iter().all(|f| f.ok);
    let _ = writeln!(
        s,
        "{}",
        if ok { "nothing is short." } else { "something is short: see tuning/ (apply.sh) for all of it." }
    );
    (s, ok)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1 << 30))
}

impl HostFacts {
    /// Reads this host.
    pub fn read() -> HostFacts {
        let num = |path: &str| read_trim(path).and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0);
        let (nofile_soft, nofile_hard) = crate::shard::sys::nofile_limit().unwrap_or((0, 0));
        let range = read_trim("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        let mut r = range.split_whitespace().filter_map(|v| v.parse().ok());
        let tcp_mem = read_trim("/proc/sys/net/ipv4/tcp_mem").unwrap_or_default();
        HostFacts {
            kernel: kernel_version(&read_trim("/proc/sys/kernel/osrelease").unwrap_or_default()),
            io_uring_disabled: num("/proc/sys/kernel/io_uring_disabled"),
            nofile_soft,
            nofile_hard,
            file_max: num("/proc/sys/fs/file-max"),
            somaxconn: num("/proc/sys/net/core/somaxconn"),
            tcp_max_syn_backlog: num("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
            netdev_max_backlog: num("/proc/sys/net/core/netdev_max_backlog"),
            port_range: (r.next().unwrap_or(0), r.next().unwrap_or(0)),
            mem_available: meminfo("MemAvailable").unwrap_or(0),
            tcp_mem_max_pages: tcp_mem.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or(0),
        }
    }
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// A `/proc/meminfo` value in bytes.
pub fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuned() -> HostFacts {
        HostFacts {
            kernel: (6, 18),
            io_uring_disabled: 0,
            nofile_soft: 20_000,
            nofile_hard: 20_000,
            file_max: 4 << 20,
            somaxconn: 262_144,
            tcp_max_syn_backlog: 262_144,
            netdev_max_backlog: 16_384,
            port_range: (32_768, 60_999),
            mem_available: 23 << 30,
            tcp_mem_max_pages: 6_291_456,
        }
    }

    #[test]
    fn a_tuned_host_is_fine_for_a_million() {
        let plan = Plan { connections: 1_000_000, with_loadgen: true };
        let findings = diagnose(&tuned(), plan);
        assert!(findings.iter().all(|f| f.ok), "{findings:?}");
        let rings = findings.iter().find(|f| f.check == "RLIMIT_NOFILE (hard)").unwrap();
        assert!(rings.fix.contains("61 rings of 18976"), "{}", rings.fix);
        let (text, ok) = render(&findings, plan);
        assert!(ok);
        assert!(text.contains("36 source addresses"), "{text}");
    }

    #[test]
    fn defaults_are_short_for_a_million_and_say_what_to_change() {
        let mut f = tuned();
        f.somaxconn = 4096;
        f.file_max = 1 << 20;
        f.mem_available = 8 << 30;
        let plan = Plan { connections: 1_000_000, with_loadgen: true };
        let findings = diagnose(&f, plan);
        let short: Vec<&str> = findings.iter().filter(|f| !f.ok).map(|f| f.check).collect();
        assert_eq!(short, ["fs.file-max", "net.core.somaxconn", "memory available"]);
        let (text, ok) = render(&findings, plan);
        assert!(!ok);
        assert!(text.contains("sysctl -w net.core.somaxconn=262144"), "{text}");
    }

    #[test]
    fn small_plans_need_no_tuning_and_old_kernels_are_flagged() {
        let mut f = tuned();
        f.somaxconn = 4096;
        f.tcp_max_syn_backlog = 4096;
        f.netdev_max_backlog = 1000;
        assert!(diagnose(&f, Plan { connections: 20_000, with_loadgen: false }).iter().all(|f| f.ok));
        f.kernel = (5, 15);
        let findings = diagnose(&f, Plan { connections: 20_000, with_loadgen: false });
        assert_eq!(findings.iter().filter(|f| !f.ok).count(), 1);
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), (6, 18));
        assert_eq!(kernel_version("5.15.0-91-generic"), (5, 15));
        assert_eq!(kernel_version(""), (0, 0));
    }

    #[test]
    fn redis_findings() {
        let down = RedisFacts { url: "redis://x".into(), reached: Err("refused".into()) };
        let f = diagnose_redis(&down);
        assert_eq!((f.len(), f[0].ok), (1, false));
        let old = RedisFacts { url: "u".into(), reached: Ok(("6.0.16".into(), "noeviction".into())) };
        assert!(!diagnose_redis(&old)[1].ok);
        let risky = RedisFacts { url: "u".into(), reached: Ok(("7.0.15".into(), "allkeys-lru".into())) };
        let f = diagnose_redis(&risky);
        assert!(f[1].ok && !f[2].ok);
        let fine = RedisFacts { url: "u".into(), reached: Ok(("7.2.4".into(), "volatile-lru".into())) };
        assert!(diagnose_redis(&fine).iter().all(|f| f.ok));
    }
}
