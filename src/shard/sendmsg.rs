//! Message headers for sends that write several queued frames in one operation. Slots live in
//! fixed chunks that never move (the kernel reads them until the send completes), allocated on
//! first use up to a bound.

/// Frames one send may carry.
pub const FRAMES_PER_SEND: usize = 16;
const CHUNK: usize = 256;

/// One in-flight sendmsg: the header and the iovecs it points to.
pub struct Slot {
    hdr: libc::msghdr,
    iov: [libc::iovec; FRAMES_PER_SEND],
}

/// The shard's pool of sendmsg slots.
pub struct Slots {
    chunks: Vec<Box<[Slot]>>,
    free: Vec<u32>,
    chunks_max: usize,
}

impl Slots {
    /// A pool of at most `max` slots (rounded up to whole chunks).
    pub fn new(max: usize) -> Slots {
        Slots { chunks: Vec::new(), free: Vec::new(), chunks_max: max.div_ceil(CHUNK).max(1) }
    }

    /// Takes a slot, growing the pool by one chunk if allowed. None when exhausted.
    pub fn alloc(&mut self) -> Option<u32> {
        if self.free.is_empty() && self.chunks.len() < self.chunks_max {
            let base = (self.chunks.len() * CHUNK) as u32;
            let chunk = (0..CHUNK)
                .map(|_| Slot {
                    hdr: zeroed_msghdr(),
                    iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; FRAMES_PER_SEND],
                })
                .collect();
            self.chunks.push(chunk);
            self.free.extend((base..base + CHUNK as u32).rev());
        }
        self.free.pop()
    }

    /// Returns a slot after its send completed.
    pub fn release(&mut self, slot: u32) {
        self.free.push(slot);
    }

    /// Fills slot `slot` with these buffers and returns its header. The pointer stays valid
    /// (chunks never move) until the pool is dropped.
    pub fn fill(&mut self, slot: u32, bufs: &[(*const u8, usize)]) -> *const libc::msghdr {
        let s = &mut self.chunks[slot as usize / CHUNK][slot as usize % CHUNK];
        let n = bufs.len().min(FRAMES_PER_SEND);
        for (iov, &(ptr, len)) in s.iov.iter_mut().zip(bufs) {
            *iov = libc::iovec { iov_base: ptr.cast_mut().cast(), iov_len: len };
        }
        s.hdr = zeroed_msghdr();
        s.hdr.msg_iov = s.iov.as_mut_ptr();
        s.hdr.msg_iovlen = n;
        &s.hdr
    }
}

fn zeroed_msghdr() -> libc::msghdr {
    libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: std::ptr::null_mut(),
        msg_iovlen: 0,
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_stable() {
        let mut s = Slots::new(300);
        let a = s.alloc().unwrap();
        let data = [1u8, 2, 3];
        let h = s.fill(a, &[(data.as_ptr(), 3), (data.as_ptr(), 1)]);
        let taken: Vec<u32> = (0..511).map_while(|_| s.alloc()).collect();
        assert_eq!(taken.len(), 511, "two chunks of 256");
        assert!(s.alloc().is_none());
        // Growing did not move the first slot.
        // SAFETY: `h` points into a chunk that is still alive and unmoved.
        let iovlen = unsafe { (*h).msg_iovlen };
        assert_eq!(iovlen, 2);
        s.release(a);
        assert_eq!(s.alloc(), Some(a));
    }
}
