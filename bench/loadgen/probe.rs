//! Readings from outside the load: memory and CPU time from /proc (the gateway's RSS, the
//! kernel's slab and TCP memory, our own RSS, a process's utime + stime, the load average), and
//! the gateway's business API over plain blocking HTTP/1.1 (room online counts, publishing the
//! probe message, metrics).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

const API_TIMEOUT: Duration = Duration::from_secs(5);
/// A response larger than this is not the gateway's small JSON.
const RESPONSE_BYTES_MAX: u64 = 1 << 20;

/// Memory figures at one moment, in bytes; None when unreadable (or no gateway pid given).
#[derive(Clone, Copy, Debug, Default)]
pub struct Readings {
    pub gateway_rss: Option<u64>,
    pub slab: Option<u64>,
    pub sunreclaim: Option<u64>,
    pub own_rss: Option<u64>,
}

impl Readings {
    pub fn now(gateway_pid: Option<u32>) -> Readings {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Readings {
            gateway_rss: gateway_pid.and_then(|pid| rss_bytes(&format!("/proc/{pid}/status"))),
            slab: kb_field(&meminfo, "Slab:"),
            sunreclaim: kb_field(&meminfo, "SUnreclaim:"),
            own_rss: rss_bytes("/proc/self/status"),
        }
    }
}

/// VmRSS of a /proc/PID/status file.
pub fn rss_bytes(path: &str) -> Option<u64> {
    kb_field(&std::fs::read_to_string(path).ok()?, "VmRSS:")
}

/// Whether process `pid` still runs: /proc has it, and it is not a zombie waiting to be reaped.
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

/// VmHWM (the peak resident set) of a /proc/PID/status file.
pub fn hwm_bytes(path: &str) -> Option<u64> {
    kb_field(&std::fs::read_to_string(path).ok()?, "VmHWM:")
}

/// CPU time (utime + stime, all threads) of the process whose stat file is `path`
/// (`/proc/PID/stat`, `/proc/self/stat`), in seconds.
pub fn cpu_s(path: &str) -> Option<f64> {
    let ticks = stat_cpu_ticks(&std::fs::read_to_string(path).ok()?)?;
    Some(ticks as f64 / crate::sys::clock_ticks_per_s() as f64)
}

/// CPU time of process `pid` and of its children (nginx's workers are child processes), in
/// seconds; None if `pid` itself cannot be read. A child that exits in between takes its time
/// with it.
pub fn tree_cpu_s(pid: u32) -> Option<f64> {
    let mut ticks = stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        if stat_ppid(&stat) == Some(pid) {
            ticks += stat_cpu_ticks(&stat).unwrap_or(0);
        }
    }
    Some(ticks as f64 / crate::sys::clock_ticks_per_s() as f64)
}

/// Field 4 (the parent's pid) of a stat line.
fn stat_ppid(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// Fields 14 and 15 of a stat line, counted after the `)` that ends the command name (which
/// may hold spaces and parentheses).
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first word, so fields 14 and 15 are words 11 and 12.
    let mut words = rest.split_whitespace().skip(11);
    let utime: u64 = words.next()?.parse().ok()?;
    let stime: u64 = words.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The sum of every sample of the Prometheus series `name` (whatever its labels).
pub fn series_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name).then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .sum::<f64>() as u64
}

/// The TCP line of /proc/net/sockstat: sockets in use, orphaned, in TIME_WAIT, allocated, and
/// the pages the TCP stack holds (`mem`, system-wide: both ends of every loopback pair).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStat {
    pub inuse: u64,
    pub orphan: u64,
    pub tw: u64,
    pub alloc: u64,
    pub mem_pages: u64,
}

/// Bytes of a page in sockstat's `mem` (x86-64).
pub const SOCKSTAT_PAGE_BYTES: u64 = 4096;

/// `TCP: inuse 5 orphan 0 tw 2 alloc 7 mem 1` out of /proc/net/sockstat's text.
pub fn tcp_sockstat(text: &str) -> Option<TcpStat> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    let field = |name: &str| -> Option<u64> {
        let i = words.iter().position(|w| *w == name)?;
        words.get(i + 1)?.parse().ok()
    };
    Some(TcpStat {
        inuse: field("inuse")?,
        orphan: field("orphan")?,
        tw: field("tw")?,
        alloc: field("alloc")?,
        mem_pages: field("mem")?,
    })
}

/// Slab caches holding TCP sockets: established and listening (`TCP`), TIME_WAIT (`tw_sock_TCP`)
/// and half-open (`request_sock_TCP`), IPv4 and IPv6.
const TCP_SLABS: [&str; 6] = ["TCP", "tw_sock_TCP", "request_sock_TCP", "TCPv6", "tw_sock_TCPv6", "request_sock_TCPv6"];

/// Bytes of the TCP socket slab caches (objects allocated × object size) out of /proc/slabinfo's
/// text (readable by root only): the sockets themselves, which sockstat's `mem` (buffers) leaves
/// out. None if no such cache is listed.
pub fn tcp_slab_bytes(text: &str) -> Option<u64> {
    let mut total = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else { continue };
        if !TCP_SLABS.contains(&name) {
            continue;
        }
        // name, active_objs, num_objs, objsize, ...
        let nums: Vec<u64> = words.take(3).filter_map(|w| w.parse().ok()).collect();
        if let [_, num_objs, objsize] = nums[..] {
            *total.get_or_insert(0) += num_objs * objsize;
        }
    }
    total
}

/// One side's TCP sockets as `ss -Htanm` lists them (the gateway's: `sport = :PORT`), by state,
/// and the memory their buffers are charged: received and unread (`skmem` r), queued to send
/// (w) and reserved ahead (f), summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketStates {
    pub established: u64,
    pub time_wait: u64,
    pub close_wait: u64,
    /// FIN-WAIT-1, FIN-WAIT-2, CLOSING, LAST-ACK: closes under way.
    pub closing: u64,
    /// SYN-RECV and anything else but LISTEN.
    pub other: u64,
    pub mem_bytes: u64,
}

/// Reads `ss -Htanm` output: a line per socket starting with its state, each followed by a
/// line with its `skmem:(...)` (TIME-WAIT sockets have none). Listeners are left out.
pub fn socket_states(text: &str) -> SocketStates {
    let mut s = SocketStates::default();
    let mut listener = false;
    for line in text.lines() {
        // A socket's line starts with its state (its skmem may follow on it or on the next).
        match line.split_whitespace().next() {
            None => continue,
            Some(word) if word.starts_with("skmem:") => {}
            Some(state) => {
                listener = state == "LISTEN";
                match state {
                    "LISTEN" => {}
                    "ESTAB" => s.established += 1,
                    "TIME-WAIT" => s.time_wait += 1,
                    "CLOSE-WAIT" => s.close_wait += 1,
                    "FIN-WAIT-1" | "FIN-WAIT-2" | "CLOSING" | "LAST-ACK" => s.closing += 1,
                    _ => s.other += 1,
                }
            }
        }
        if let Some(at) = line.find("skmem:(")
            && !listener
        {
            s.mem_bytes += skmem_charged(&line[at + 7..]);
        }
    }
    s
}

/// r + w + f of `r0,rb131072,t0,tb16384,f0,w0,o0,bl0,d0)`.
fn skmem_charged(fields: &str) -> u64 {
    let fields = fields.split(')').next().unwrap_or("");
    fields
        .split(',')
        .filter_map(|kv| {
            let name_len = kv.find(|c: char| c.is_ascii_digit())?;
            let (name, value) = kv.split_at(name_len);
            matches!(name, "r" | "w" | "f").then(|| value.parse::<u64>().ok()).flatten()
        })
        .sum()
}

/// The one-minute load average out of /proc/loadavg's text.
pub fn loadavg1(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The sum of every sample of the Prometheus series `name`, per value of its label `label`
/// (samples without it go under "").
pub fn series_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (base, labels) = series.split_once('{').unwrap_or((series, ""));
        let Ok(v) = value.trim().parse::<f64>() else { continue };
        if base != name {
            continue;
        }
        let key = format!("{label}=\"");
        let which = labels
            .split(',')
            .find_map(|kv| kv.trim().strip_prefix(key.as_str()))
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("");
        *out.entry(which.to_string()).or_insert(0) += v as u64;
    }
    out
}

/// `Name:   1234 kB` → 1234 × 1024.
fn kb_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let mut words = line[name.len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(n * 1024),
        Some(_) => None,
    }
}

/// Why an API call did not get an answer.
#[derive(Debug)]
pub enum ApiError {
    Io(std::io::Error),
    /// Not an HTTP response, or not the JSON expected.
    Malformed,
}

impl ApiError {
    /// A stable name for the error counts.
    pub fn kind(&self) -> String {
        match self {
            ApiError::Io(e) => match e.raw_os_error() {
                Some(n) => format!("api_{}", crate::errors::errno_name(n)),
                None => format!("api_{:?}", e.kind()).to_lowercase(),
            },
            ApiError::Malformed => "api_malformed".into(),
        }
    }
}

/// The gateway's business API.
pub struct Api {
    pub addr: SocketAddrV4,
    pub key: String,
}

impl Api {
    /// `GET /v1/rooms/{room}` → its `online` count.
    pub fn online(&self, room: &str) -> Result<u64, ApiError> {
        let (status, body) = self.call("GET", &format!("/v1/rooms/{room}"), "")?;
        if status != 200 {
            return Err(ApiError::Malformed);
        }
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| ApiError::Malformed)?;
        v["online"].as_u64().ok_or(ApiError::Malformed)
    }

    /// `GET /v1/rooms/{room}` → its `last_seq` (a number, or a string of one) and `pending`
    /// (messages accepted and not yet cut into a block: they have no seq yet).
    pub fn last_seq(&self, room: &str) -> Result<(u64, u64), ApiError> {
        let (status, body) = self.call("GET", &format!("/v1/rooms/{room}"), "")?;
        if status != 200 {
            return Err(ApiError::Malformed);
        }
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| ApiError::Malformed)?;
        let last = json_u64(&v["last_seq"]).ok_or(ApiError::Malformed)?;
        Ok((last, json_u64(&v["pending"]).unwrap_or(0)))
    }

    /// `GET path` → (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String), ApiError> {
        self.call("GET", path, "")
    }

    /// `POST /v1/rooms/{room}/messages` with a JSON body; returns the status.
    pub fn publish(&self, room: &str, body: &str) -> Result<u16, ApiError> {
        Ok(self.call("POST", &format!("/v1/rooms/{room}/messages"), body)?.0)
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics(&self) -> Result<String, ApiError> {
        match self.call("GET", "/metrics", "")? {
            (200, body) => Ok(body),
            _ => Err(ApiError::Malformed),
        }
    }

    /// One request on its own connection (`Connection: close`); returns (status, body).
    fn call(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), ApiError> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(self.addr), API_TIMEOUT).map_err(ApiError::Io)?;
        s.set_read_timeout(Some(API_TIMEOUT)).map_err(ApiError::Io)?;
        s.set_write_timeout(Some(API_TIMEOUT)).map_err(ApiError::Io)?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        if !self.key.is_empty() {
            req.push_str(&format!("X-Api-Key: {}\r\n", self.key));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).map_err(ApiError::Io)?;
        let mut out = Vec::new();
        s.take(RESPONSE_BYTES_MAX).read_to_end(&mut out).map_err(ApiError::Io)?;
        parse_response(&out).ok_or(ApiError::Malformed)
    }
}

/// A u64 in JSON: a number, or a string of one (protobuf JSON writes 64-bit integers as strings).
pub fn json_u64(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// `HTTP/1.1 NNN ...\r\n...\r\n\r\nbody` → (NNN, body).
fn parse_response(bytes: &[u8]) -> Option<(u16, String)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut first = head.lines().next()?.split_whitespace();
    if !first.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = first.next()?.parse().ok()?;
    Some((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kb_fields() {
        let meminfo = "MemTotal:       24000000 kB\nSlab:             123456 kB\nSUnreclaim:        65432 kB\n";
        assert_eq!(kb_field(meminfo, "Slab:"), Some(123456 * 1024));
        assert_eq!(kb_field(meminfo, "SUnreclaim:"), Some(65432 * 1024));
        assert_eq!(kb_field(meminfo, "Missing:"), None);
        assert_eq!(kb_field("VmRSS:\t  2048 kB\n", "VmRSS:"), Some(2048 * 1024));
        assert_eq!(kb_field("VmRSS: 12 MB\n", "VmRSS:"), None);
    }

    #[test]
    fn we_are_alive_and_pid_zero_is_not_a_process() {
        assert!(alive(std::process::id()));
        assert!(!alive(0));
        assert!(hwm_bytes("/proc/self/status").unwrap() >= rss_bytes("/proc/self/status").unwrap() / 2);
    }

    #[test]
    fn own_readings_are_there() {
        let r = Readings::now(Some(std::process::id()));
        assert!(r.own_rss.unwrap() > 0);
        assert!(r.gateway_rss.unwrap() > 0);
        assert!(r.slab.unwrap() > 0);
    }

    #[test]
    fn cpu_ticks_come_after_the_name() {
        let stat = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 99";
        assert_eq!(stat_cpu_ticks(stat), Some(300));
        assert_eq!(stat_cpu_ticks("1 (x) S 1 2"), None);
        assert_eq!(stat_ppid(stat), Some(1));
        assert!(cpu_s("/proc/self/stat").is_some());
        let own = cpu_s("/proc/self/stat").unwrap();
        assert!(tree_cpu_s(std::process::id()).unwrap() >= own);
    }

    #[test]
    fn series_sum_adds_every_label_set() {
        let text = "# HELP barrage_messages_dropped_total x\n\
            barrage_messages_dropped_total{shard=\"0\",reason=\"overflow\"} 3\n\
            barrage_messages_dropped_total{shard=\"1\",reason=\"expired\"} 4\n\
            barrage_messages_dropped_totally 100\n\
            barrage_frames_dropped_total{shard=\"0\",reason=\"slow_consumer\"} 2\n";
        assert_eq!(series_sum(text, "barrage_messages_dropped_total"), 7);
        assert_eq!(series_sum(text, "barrage_frames_dropped_total"), 2);
        assert_eq!(series_sum(text, "missing"), 0);
    }

    #[test]
    fn reads_sockstat_and_loadavg() {
        let text =
            "sockets: used 20025\nTCP: inuse 20008 orphan 3 tw 9759 alloc 20010 mem 310929\nUDP: inuse 0 mem 0\n";
        let t = tcp_sockstat(text).unwrap();
        assert_eq!(t, TcpStat { inuse: 20008, orphan: 3, tw: 9759, alloc: 20010, mem_pages: 310929 });
        assert_eq!(tcp_sockstat("UDP: inuse 0 mem 0\n"), None);
        assert!(tcp_sockstat(&std::fs::read_to_string("/proc/net/sockstat").unwrap()).is_some());
        assert_eq!(loadavg1("5.38 4.28 3.61 3/402 8716\n"), Some(5.38));
        let slabinfo = "slabinfo - version: 2.1\n\
            # name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables\n\
            MPTCP                  0      0   1984   16    8 : tunables    0    0    0 : slabdata      0      0      0\n\
            tw_sock_TCP         5271   5376    256   16    1 : tunables    0    0    0 : slabdata    336    336      0\n\
            TCP                  131    182   2368   13    8 : tunables    0    0    0 : slabdata     14     14      0\n";
        assert_eq!(tcp_slab_bytes(slabinfo), Some(5376 * 256 + 182 * 2368));
        assert_eq!(tcp_slab_bytes("slabinfo - version: 2.1\n"), None);
        assert_eq!(loadavg1(""), None);
    }

    #[test]
    fn socket_states_count_by_state_and_add_charged_memory() {
        let text = "LISTEN    0      4096       127.0.0.1:18960       0.0.0.0:*\n\
            \t skmem:(r0,rb131072,t0,tb16384,f4096,w0,o0,bl0,d0)\n\
            ESTAB     0      0       127.0.0.1:18960    127.0.70.1:10000\n\
            \t skmem:(r100,rb131072,t0,tb65536,f3996,w0,o0,bl0,d0)\n\
            ESTAB     0      0       127.0.0.1:18960    127.0.70.2:10000\n\
            \t skmem:(r0,rb131072,t2,tb65536,f1000,w2000,o0,bl0,d0)\n\
            TIME-WAIT 0      0       127.0.0.1:18960    127.0.70.1:10001\n\
            \t                                               \n\
            FIN-WAIT-2 0     0       127.0.0.1:18960    127.0.70.1:10002\n\
            \t skmem:(r0,rb131072,t0,tb65536,f0,w0,o0,bl0,d0)\n\
            CLOSE-WAIT 1     0       127.0.0.1:18960    127.0.70.1:10003\n\
            SYN-RECV  0      0       127.0.0.1:18960    127.0.70.1:10004\n\
            ESTAB     0      0       127.0.0.1:18960    127.0.70.3:10000 skmem:(r7,rb1,t0,tb1,f0,w0,o0,bl0,d0)\n";
        let s = socket_states(text);
        assert_eq!(
            s,
            SocketStates {
                established: 3,
                time_wait: 1,
                close_wait: 1,
                closing: 1,
                other: 1,
                mem_bytes: 100 + 3996 + 1000 + 2000 + 7
            }
        );
        assert_eq!(socket_states(""), SocketStates::default());
    }

    #[test]
    fn series_by_label_adds_shards_per_value() {
        let text = "# HELP barrage_closed_total x\n\
            barrage_closed_total{shard=\"0\",reason=\"peer\"} 3\n\
            barrage_closed_total{shard=\"1\",reason=\"peer\"} 4\n\
            barrage_closed_total{shard=\"1\",reason=\"idle\"} 1\n\
            barrage_closed_totally{reason=\"peer\"} 100\n\
            barrage_rings{shard=\"0\"} 2\n";
        let m = series_by_label(text, "barrage_closed_total", "reason");
        assert_eq!(m.into_iter().collect::<Vec<_>>(), [("idle".to_string(), 1), ("peer".to_string(), 7)]);
        let r = series_by_label(text, "barrage_rings", "reason");
        assert_eq!(r.get(""), Some(&2));
        assert!(series_by_label(text, "missing", "reason").is_empty());
    }

    #[test]
    fn parses_responses() {
        let r = b"HTTP/1.1 202 Accepted\r\nContent-Length: 9\r\n\r\n{\"id\":1}\n";
        assert_eq!(parse_response(r), Some((202, "{\"id\":1}\n".into())));
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(parse_response(b"SSH-2.0\r\n\r\n"), None);
    }
}
