//! A provided-buffer ring (io_uring's `IORING_REGISTER_PBUF_RING`): buffers the kernel picks
//! from as bytes arrive, handed back after each completion is processed. Owned by
//! [`super::uring::Uring`], under both the gateway's rings and the load generator's.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;

/// The kernel's `struct io_uring_buf`; in the first entry, `resv` is the ring's tail.
#[repr(C)]
struct BufEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

/// A provided-buffer ring: `count` buffers of `size` bytes the kernel picks from as data
/// arrives, so a connection holds no buffer while it is idle.
pub struct BufRing {
    entries: NonNull<BufEntry>,
    entries_bytes: usize,
    data: NonNull<u8>,
    data_bytes: usize,
    size: u32,
    count: u16,
    tail: u16,
}

impl BufRing {
    /// `count` (a power of two) buffers of `size` bytes, all published to the kernel.
    pub fn new(count: u16, size: u32) -> io::Result<BufRing> {
        if !count.is_power_of_two() {
            return Err(io::Error::other("the receive buffer count must be a power of two"));
        }
        let entries_bytes = usize::from(count) * std::mem::size_of::<BufEntry>();
        let data_bytes = usize::from(count) * size as usize;
        let entries = mmap(entries_bytes)?.cast::<BufEntry>();
        let data = match mmap(data_bytes) {
            Ok(d) => d,
            Err(e) => {
                munmap(entries.cast(), entries_bytes);
                return Err(e);
            }
        };
        let mut ring = BufRing { entries, entries_bytes, data, data_bytes, size, count, tail: 0 };
        for bid in 0..count {
            ring.give_back(bid);
        }
        Ok(ring)
    }

    /// Registers the ring with `uring` as buffer group `group`.
    ///
    /// The owner must drop `uring` before this BufRing (declare the ring field first).
    pub(super) fn register(&self, uring: &IoUring, group: u16) -> io::Result<()> {
        // SAFETY: the entry array is page-aligned (mmap), holds `count` entries, and stays mapped
        // until this BufRing drops, which its owner arranges to happen after the ring that uses
        // it (documented above; `uring::Uring`, the owner, declares the ring first).
        unsafe { uring.submitter().register_buf_ring_with_flags(self.entries.as_ptr() as u64, self.count, group, 0) }
    }

    /// Size of one buffer.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Number of buffers.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// The first `len` bytes of buffer `bid`, which a completion just handed to us.
    pub fn filled(&mut self, bid: u16, len: usize) -> Option<&mut [u8]> {
        if bid >= self.count || len > self.size as usize {
            return None;
        }
        let offset = usize::from(bid) * self.size as usize;
        // SAFETY: `bid < count` and `len <= size`, so the range lies inside the mapping. A
        // completion naming `bid` gave the buffer to us: the kernel will not touch it until
        // `give_back(bid)` republishes it, and `&mut self` prevents a second borrow meanwhile.
        Some(unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr().add(offset), len) })
    }

    /// Republishes buffer `bid` at the tail.
    pub fn give_back(&mut self, bid: u16) {
        if bid >= self.count {
            return;
        }
        let index = usize::from(self.tail & (self.count - 1));
        let addr = self.data.as_ptr() as u64 + u64::from(bid) * u64::from(self.size);
        // SAFETY: `index < count`, inside the entry mapping. The kernel reads entries only
        // between its head and the published tail, and this one lies at the unpublished tail.
        // Fields are written one by one so entry 0's `resv` (the tail the kernel reads) is
        // never written here.
        unsafe {
            let e = self.entries.as_ptr().add(index);
            std::ptr::addr_of_mut!((*e).addr).write(addr);
            std::ptr::addr_of_mut!((*e).len).write(self.size);
            std::ptr::addr_of_mut!((*e).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: entry 0's `resv` is the ring tail, a u16 the kernel reads concurrently; an
        // atomic release store publishes the entry written above before the new tail.
        unsafe {
            let tail = std::ptr::addr_of_mut!((*self.entries.as_ptr()).resv);
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        munmap(self.entries.cast(), self.entries_bytes);
        munmap(self.data, self.data_bytes);
    }
}

fn mmap(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping with no address hint touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

fn munmap(p: NonNull<u8>, len: usize) {
    // SAFETY: `p..p+len` is a mapping made by `mmap` above and no reference into it survives
    // (the BufRing that owned it is being dropped).
    unsafe {
        libc::munmap(p.as_ptr().cast(), len);
    }
}
