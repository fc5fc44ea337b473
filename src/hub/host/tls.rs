//! `wss://`: TLS between the driver and the rest of the host, when `tls.cert`/`tls.key` are set
//! (the public listener then speaks only TLS). Bytes received are ciphertext: the handshake runs
//! in them (rustls's unbuffered API), then records are decrypted in place in the driver's buffer
//! and the plaintext takes the usual walk (`plain_recv`). Frames to send are gathered as usual,
//! sealed into one buffer per connection for one send, and released from the outbox at once
//! (a sealed record cannot be re-sealed: the sequence number moved on); the buffer is freed when
//! the send completes. An idle TLS connection holds its record keys (`tls::record`) and nothing
//! else: no input, no output buffer.
//!
//! With kernel TLS (`tls.kernel`, where the kernel has it), the first moment after the
//! handshake that nothing sealed is unsent, the send keys go to the kernel (`poll_kernel_tls`;
//! no send starts until it answers) and from then on the connection's frames are sent as a
//! plain connection's; the kernel seals them.

use std::io::IoSlice;

use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;

use super::Host;
use super::conn::State;
use crate::ids::{ConnKey, Now};
use crate::metrics::Series;
use crate::tls::handshake::{Handshake, Step};
use crate::tls::kernel::TxInfo;
use crate::tls::record::{MAX_FRAGMENT, Opened, Records, TlsError};

/// Ciphertext a connection may hold while a record (or the client's handshake flight) is
/// incomplete: one largest record and its header, or a ClientHello and its follow-ups. (The
/// partial-input floor adds `config::TLS_RECORD_HELD` for it, its buffer's slack included.)
const INPUT_MAX: usize = MAX_FRAGMENT + 2048;
const _: () = assert!(2 * INPUT_MAX <= crate::config::TLS_RECORD_HELD);

/// One connection's TLS.
pub(super) struct TlsConn {
    state: Phase,
    /// Ciphertext received and not yet consumed (empty between records).
    input: Vec<u8>,
    /// Sealed bytes not yet written (empty when idle); `sending` while a send holds them.
    out: Vec<u8>,
    sending: bool,
    kernel: Kernel,
}

/// Where a connection's sending stands with kernel TLS.
enum Kernel {
    /// Sealed in user space.
    Off,
    /// To hand over once nothing sealed is unsent.
    Want,
    /// Handed to the driver (`poll_kernel_tls`); its setsockopts read the info until
    /// `handle_kernel_tls`.
    Queued(Box<TxInfo>),
    InFlight(Box<TxInfo>),
    /// The kernel seals: frames go out as on a plain connection.
    On,
}

enum Phase {
    Handshaking(Box<Handshake>),
    Open { records: Box<Records>, keys: Option<Box<KernelConnection<ServerConnectionData>>> },
    Failed,
}

impl Host {
    /// A new connection on a TLS listener starts its handshake.
    pub(super) fn tls_accept(&mut self, key: ConnKey) {
        let Some(config) = self.cfg.tls.clone() else { return };
        let state = match Handshake::new(config, self.cfg.tls_key_updates) {
            Ok(h) => Phase::Handshaking(Box::new(h)),
            Err(_) => Phase::Failed,
        };
        let tls = TlsConn { state, input: Vec::new(), out: Vec::new(), sending: false, kernel: Kernel::Off };
        self.tls.insert(key, tls);
    }

    /// Ciphertext from the peer.
    pub(super) fn tls_recv(&mut self, key: ConnKey, data: &mut [u8], now: Now) {
        let Some(t) = self.tls.get_mut(&key) else { return };
        if matches!(self.conns.get(key).state, State::Flushing | State::Terminating) {
            return;
        }
        if let Phase::Handshaking(hs) = &mut t.state {
            t.input.extend_from_slice(data);
            let before = t.out.len();
            let step = hs.feed(&mut t.input, &mut t.out);
            if t.out.len() > before {
                self.conns.mark_ready(key);
            }
            let early = match step {
                Ok(Step::More) if t.input.len() > INPUT_MAX => {
                    return self.tls_failed(key, Series::TlsHandshakeTooLarge);
                }
                Ok(Step::More) => return self.tls_hold(key, now),
                Ok(Step::Done(e)) => {
                    let e = *e;
                    t.state = Phase::Open { records: Box::new(e.records), keys: e.keys.map(Box::new) };
                    t.kernel = if self.cfg.tls_kernel { Kernel::Want } else { Kernel::Off };
                    self.counters.inc(Series::TlsHandshakes);
                    e.plaintext
                }
                Err(TlsError::Alert(_)) => return self.tls_refused(key, Series::TlsHandshakeAlert, now),
                Err(TlsError::Incompatible) => return self.tls_refused(key, Series::TlsHandshakeIncompatible, now),
                Err(_) => return self.tls_refused(key, Series::TlsHandshake, now),
            };
            let mut early = early;
            if !early.is_empty() {
                self.plain_recv(key, &mut early, now);
            }
            // Records that came right behind the handshake.
            let mut rest = match self.tls.get_mut(&key) {
                Some(t) => std::mem::take(&mut t.input),
                None => return,
            };
            if !rest.is_empty() {
                self.tls_records(key, &mut rest, now);
            }
            return self.tls_hold(key, now);
        }
        // Between records nothing is held: decrypt in the driver's buffer.
        if t.input.is_empty() {
            self.tls_records(key, data, now);
        } else {
            let mut input = std::mem::take(&mut t.input);
            input.extend_from_slice(data);
            self.tls_records(key, &mut input, now);
        }
        self.tls_hold(key, now);
    }

    /// Opens the complete records in `buf` and hands their plaintext on; keeps an incomplete
    /// tail as the connection's input.
    fn tls_records(&mut self, key: ConnKey, buf: &mut [u8], now: Now) {
        let mut at = 0;
        loop {
            let Some(t) = self.tls.get_mut(&key) else { return };
            let kernel_tx = !matches!(t.kernel, Kernel::Off);
            let Phase::Open { records, keys } = &mut t.state else { return };
            let opened = records.open(&mut buf[at..]);
            let (used, what) = match opened {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => return self.tls_failed(key, tls_series(e)),
            };
            match what {
                Opened::Data(range) => {
                    let (from, to) = (at + range.start, at + range.end);
                    at += used;
                    if to > from {
                        self.plain_recv(key, &mut buf[from..to], now);
                    }
                }
                Opened::Closed => {
                    self.handle_eof(key);
                    return;
                }
                Opened::KeyUpdate { update_requested } => {
                    at += used;
                    // Without the key-update state (`tls.key_updates = false`) the peer is closed.
                    let Some(k) = keys.as_mut() else { return self.tls_failed(key, Series::TlsKeyUpdate) };
                    let next = k.update_rx_secret().map_err(|_| TlsError::Unsupported);
                    if next.and_then(|n| records.rekey_rx(n)).is_err() {
                        return self.tls_failed(key, Series::TlsRecord);
                    }
                    if update_requested && kernel_tx {
                        // The send keys are (or are about to be) the kernel's.
                        return self.tls_failed(key, Series::TlsKeyUpdate);
                    }
                    if update_requested {
                        let sealed = records.key_update(&mut t.out);
                        let next = k.update_tx_secret().map_err(|_| TlsError::Unsupported);
                        if sealed.and(next.and_then(|n| records.rekey_tx(n))).is_err() {
                            return self.tls_failed(key, Series::TlsRecord);
                        }
                        self.conns.mark_ready(key);
                    }
                }
            }
            if !matches!(self.conns.get(key).state, State::Handshake | State::Open | State::Closing | State::Polling) {
                return;
            }
        }
        if let Some(t) = self.tls.get_mut(&key) {
            t.input.extend_from_slice(&buf[at..]);
        }
    }

    /// Accounts the ciphertext a connection holds in the partial-input budgets.
    fn tls_hold(&mut self, key: ConnKey, now: Now) {
        let Some(t) = self.tls.get(&key) else { return };
        if t.input.len() > INPUT_MAX {
            return self.tls_failed(key, Series::TlsRecord);
        }
        if self.conns.get(key).state == State::Terminating {
            return;
        }
        let held = t.input.capacity() + self.conns.get(key).reader.held_bytes();
        let budget = self.intake.hold(key, held);
        self.within_budget(key, budget, now);
    }

    /// The ciphertext a connection holds (for the budget's other holders).
    pub(super) fn tls_held(&self, key: ConnKey) -> usize {
        // Called on every read: no hashing at all on a plain listener.
        if self.tls.is_empty() {
            return 0;
        }
        self.tls.get(&key).map_or(0, |t| t.input.capacity())
    }

    /// A handshake that failed: counted; the alert rustls has for the peer (if any) is sent,
    /// then the connection closes.
    fn tls_refused(&mut self, key: ConnKey, series: Series, now: Now) {
        let Some(t) = self.tls.get_mut(&key) else { return };
        if t.out.is_empty() {
            return self.tls_failed(key, series);
        }
        t.state = Phase::Failed;
        t.input = Vec::new();
        let sending = t.sending;
        self.counters.inc(series);
        self.intake.release(key);
        let deadline = now.tick_after(self.cfg.close_timeout_ms);
        let conn = self.conns.get_mut(key);
        conn.state = State::Flushing;
        conn.deadline = deadline;
        if !sending {
            self.conns.mark_ready(key);
        }
    }

    /// A handshake or record the connection cannot go on from: counted, closed at once (no
    /// WebSocket Close can be sent over a broken record layer).
    fn tls_failed(&mut self, key: ConnKey, series: Series) {
        if let Some(t) = self.tls.get_mut(&key) {
            t.state = Phase::Failed;
            t.input = Vec::new();
        }
        self.counters.inc(series);
        self.terminate(key, None);
    }

    /// The next send of a TLS connection: what is sealed and unsent, else the queued frames
    /// sealed now (and released from the outbox). Returns the slices filled (0 or 1).
    pub(super) fn tls_poll_send<'a>(&'a mut self, key: ConnKey, iov: &mut [IoSlice<'a>]) -> usize {
        if self.tls.get(&key).is_some_and(|t| matches!(t.kernel, Kernel::On)) {
            return self.plain_poll_send(key, iov);
        }
        let conn = self.conns.get_mut(key);
        let Some(t) = self.tls.get_mut(&key) else { return 0 };
        if t.sending || conn.state == State::Terminating || matches!(t.kernel, Kernel::Queued(_) | Kernel::InFlight(_))
        {
            return 0;
        }
        if matches!(t.kernel, Kernel::Want)
            && t.out.is_empty()
            && let Phase::Open { records, .. } = &t.state
        {
            match TxInfo::new(records) {
                Some(info) => {
                    t.kernel = Kernel::Queued(Box::new(info));
                    self.kernel_tls.push(key);
                    return 0;
                }
                None => t.kernel = Kernel::Off,
            }
        }
        if t.out.is_empty()
            && !conn.queue.is_empty()
            && let Phase::Open { records, .. } = &mut t.state
        {
            let format = conn.wire();
            let mut frames = [IoSlice::new(&[]); 16];
            let n = self.outbox.gather(&mut conn.queue, format, &mut frames);
            let mut parts: [&[u8]; 16] = [&[]; 16];
            for (p, f) in parts.iter_mut().zip(&frames[..n]) {
                *p = f;
            }
            let plain = parts[..n].iter().map(|p| p.len()).sum();
            // One stream of records: small frames share one, the key is expanded once.
            let sealed = records.seal_all(&parts[..n], &mut t.out);
            self.outbox.sent(&mut conn.queue, format, plain);
            self.counters.add(Series::FramesOut, n as u64);
            if sealed.is_err() {
                t.out.clear();
            }
        }
        if t.out.is_empty() {
            return 0;
        }
        t.sending = true;
        self.conns.send_started();
        self.counters.inc(Series::Sends);
        iov[0] = IoSlice::new(&t.out);
        1
    }

    /// A TLS connection's send completed.
    pub(super) fn tls_sent(&mut self, key: ConnKey, result: i32) {
        if self.tls.get(&key).is_some_and(|t| matches!(t.kernel, Kernel::On)) {
            return self.plain_sent(key, result);
        }
        self.conns.send_ended();
        let Some(t) = self.tls.get_mut(&key) else { return };
        assert!(t.sending, "{key:?}: a TLS send completed with none in flight");
        t.sending = false;
        if result < 0 {
            t.out = Vec::new();
            if self.conns.get(key).state != State::Terminating {
                self.abort(key, Series::ClosedError);
            }
            return;
        }
        self.counters.add(Series::BytesOut, result as u64);
        t.out.drain(..(result as usize).min(t.out.len()));
        if t.out.is_empty() {
            // Idle again: no buffer kept.
            t.out = Vec::new();
        }
        let pending = !t.out.is_empty();
        let conn = self.conns.get_mut(key);
        if conn.queue.is_empty() {
            conn.behind_since = 0;
        }
        match conn.state {
            State::Terminating => {}
            _ if pending || !conn.queue.is_empty() => self.conns.mark_ready(key),
            State::Flushing => self.terminate(key, None),
            State::Handshake | State::Open | State::Closing | State::Polling => {}
        }
    }

    /// The connection ended: what it held goes, but a send in flight keeps its buffer until it
    /// completes.
    pub(super) fn tls_end(&mut self, key: ConnKey) {
        if self.tls.is_empty() {
            return;
        }
        if let Some(t) = self.tls.get_mut(&key) {
            t.state = Phase::Failed;
            t.input = Vec::new();
            if !t.sending {
                t.out = Vec::new();
            }
        }
    }

    /// Whether a TLS send, or the hand-over to the kernel, is in flight (its buffer must
    /// outlive it).
    pub(super) fn tls_sending(&self, key: ConnKey) -> bool {
        !self.tls.is_empty() && self.tls.get(&key).is_some_and(|t| t.sending || matches!(t.kernel, Kernel::InFlight(_)))
    }

    /// Next connection whose send keys go to the kernel now (see `kernel_tls_info`).
    pub fn poll_kernel_tls(&mut self) -> Option<ConnKey> {
        while let Some(key) = self.kernel_tls.pop() {
            let Some(t) = self.tls.get_mut(&key) else { continue };
            let info = match std::mem::replace(&mut t.kernel, Kernel::Off) {
                Kernel::Queued(info) => info,
                other => {
                    t.kernel = other;
                    continue;
                }
            };
            if self.conns.get(key).state == State::Terminating {
                continue;
            }
            t.kernel = Kernel::InFlight(info);
            return Some(key);
        }
        None
    }

    /// The `crypto_info` of a hand-over in flight.
    pub fn kernel_tls_info(&self, key: ConnKey) -> Option<&[u8]> {
        match &self.tls.get(&key)?.kernel {
            Kernel::InFlight(info) => Some(info.as_bytes()),
            _ => None,
        }
    }

    /// The kernel took the send keys (`result` >= 0) or did not: then sealing stays here.
    pub fn handle_kernel_tls(&mut self, key: ConnKey, result: i32) {
        let Some(t) = self.tls.get_mut(&key) else { return };
        if !matches!(t.kernel, Kernel::InFlight(_)) {
            return;
        }
        if result >= 0 {
            t.kernel = Kernel::On;
            self.counters.inc(Series::TlsKernel);
        } else {
            t.kernel = Kernel::Off;
            self.counters.inc(Series::TlsKernelFallback);
        }
        let conn = self.conns.get(key);
        if conn.state != State::Terminating && !conn.queue.is_empty() {
            self.conns.mark_ready(key);
        }
    }
}

fn tls_series(e: TlsError) -> Series {
    match e {
        TlsError::Alert(_) => Series::TlsAlert,
        _ => Series::TlsRecord,
    }
}
