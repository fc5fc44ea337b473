//! A hook's circuit breaker: after `failures_max` failed requests in a row it opens, and for
//! `open_ms` no request is made (calls get the hook's failure policy at once, so a dead backend
//! costs neither a timeout per call nor a thread stuck per request). Then one request probes
//! the backend: a success closes the breaker, a failure opens it again. Sans-IO: the caller
//! passes the time.
#![forbid(unsafe_code)]

#[derive(Debug)]
pub struct Breaker {
    failures_max: u32,
    open_ms: u64,
    failures: u32,
    /// Open until this time (ms); a probe is out while `probing`.
    open_until: Option<u64>,
    probing: bool,
}

/// What the breaker says about making a request now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The probe after an open period: its outcome decides.
    Probe,
    /// Open: fail without asking.
    No,
}

impl Breaker {
    /// `failures_max` 0: never opens.
    pub fn new(failures_max: u32, open_ms: u64) -> Breaker {
        Breaker { failures_max, open_ms, failures: 0, open_until: None, probing: false }
    }

    pub fn admit(&mut self, now_ms: u64) -> Admit {
        match self.open_until {
            None => Admit::Yes,
            Some(until) if now_ms >= until && !self.probing => {
                self.probing = true;
                Admit::Probe
            }
            Some(_) => Admit::No,
        }
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    /// A failed request; true when this opened the breaker.
    pub fn failed(&mut self, now_ms: u64) -> bool {
        self.failures = self.failures.saturating_add(1);
        let trip = self.probing || (self.failures_max > 0 && self.failures >= self.failures_max);
        self.probing = false;
        if trip {
            self.open_until = Some(now_ms + self.open_ms);
        }
        trip
    }

    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_in_a_row_then_probes_once() {
        let mut b = Breaker::new(3, 1000);
        assert_eq!(b.admit(0), Admit::Yes);
        assert!(!b.failed(0));
        b.succeeded();
        assert!(!b.failed(1) && !b.failed(2), "a success reset the count");
        assert!(b.failed(3), "third in a row");
        assert!(b.is_open());
        assert_eq!(b.admit(500), Admit::No);
        assert_eq!(b.admit(1003), Admit::Probe);
        assert_eq!(b.admit(1004), Admit::No, "one probe at a time");
        assert!(b.failed(1010), "a failed probe opens it again");
        assert_eq!(b.admit(1500), Admit::No);
        assert_eq!(b.admit(2010), Admit::Probe);
        b.succeeded();
        assert!(!b.is_open());
        assert_eq!(b.admit(2011), Admit::Yes);
    }

    #[test]
    fn zero_never_opens() {
        let mut b = Breaker::new(0, 1000);
        for t in 0..100 {
            assert!(!b.failed(t));
        }
        assert_eq!(b.admit(100), Admit::Yes);
    }
}
