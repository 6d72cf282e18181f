//! Many O_DIRECT writes to one file in flight at once, on an io_uring owned by the calling
//! thread (each flusher thread gets its own, so partitions never share or lock one). Used
//! by [`crate::medium::FileMedium::write_many`]: a batch of records reaches the medium at the
//! device's queue depth instead of one write at a time.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;

/// Writes in flight at once (and the ring's size).
const RING_DEPTH: u32 = 32;

thread_local! {
    static RING: RefCell<Option<io_uring::IoUring>> = const { RefCell::new(None) };
}

/// Writes every `(offset, data)` to `fd`; returns once all have completed (the buffers are
/// never released while the kernel may still read them), with the first error if any.
pub(crate) fn write_all(fd: RawFd, writes: &[(u64, &[u8])]) -> io::Result<()> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ring = match &mut *slot {
            Some(ring) => ring,
            empty => empty.insert(io_uring::IoUring::new(RING_DEPTH)?),
        };
        let outcome = submit_and_reap(ring, fd, writes);
        if outcome.poisoned {
            // Entries the kernel refused may still sit in the submission queue: never let a
            // later call submit them (their buffers are gone). A new ring replaces this one.
            *slot = None;
        }
        outcome.result
    })
}

struct Outcome {
    result: io::Result<()>,
    poisoned: bool,
}

fn submit_and_reap(ring: &mut io_uring::IoUring, fd: RawFd, writes: &[(u64, &[u8])]) -> Outcome {
    let mut next = 0;
    // Pushed to the submission queue, not yet taken by the kernel / taken, not completed.
    let (mut queued, mut submitted) = (0usize, 0usize);
    let mut first_error: Option<io::Error> = None;
    let mut poisoned = false;
    // Short writes are finished synchronously once the ring is drained.
    let mut short: Vec<(usize, usize)> = Vec::new();
    loop {
        while first_error.is_none()
            && next < writes.len()
            && queued + submitted < RING_DEPTH as usize
        {
            let (off, data) = writes[next];
            let Ok(len) = u32::try_from(data.len()) else {
                first_error = Some(io::Error::other("a medium write larger than 4 GiB"));
                break;
            };
            let sqe = io_uring::opcode::Write::new(io_uring::types::Fd(fd), data.as_ptr(), len)
                .offset(off)
                .build()
                .user_data(next as u64);
            // SAFETY: `data` lives in `writes`, which outlives this call, and this function
            // returns only once every write the kernel took has completed; a ring that may
            // still hold refused entries is dropped by the caller.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                break;
            }
            next += 1;
            queued += 1;
        }
        if queued + submitted == 0 {
            break;
        }
        if poisoned {
            // Wait for what the kernel took without submitting what it refused.
            ring.completion().sync();
            if ring.completion().is_empty() {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        } else {
            match ring.submit_and_wait(1) {
                Ok(n) => {
                    let n = n.min(queued);
                    queued -= n;
                    submitted += n;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                    poisoned = true;
                    queued = 0;
                }
            }
        }
        for cqe in ring.completion() {
            submitted = submitted.saturating_sub(1);
            let i = cqe.user_data() as usize;
            match cqe.result() {
                r if r < 0 => {
                    first_error.get_or_insert(io::Error::from_raw_os_error(-r));
                }
                r if (r as usize) < writes[i].1.len() => short.push((i, r as usize)),
                _ => {}
            }
        }
    }
    let result = match first_error {
        Some(e) => Err(e),
        None => finish_short_writes(fd, writes, &short),
    };
    Outcome { result, poisoned }
}

fn finish_short_writes(
    fd: RawFd,
    writes: &[(u64, &[u8])],
    short: &[(usize, usize)],
) -> io::Result<()> {
    if short.is_empty() {
        return Ok(());
    }
    // SAFETY: borrows the caller's open fd for these writes; ManuallyDrop never closes it.
    let file = std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    for &(i, done) in short {
        let (off, data) = writes[i];
        file.write_all_at(&data[done..], off + done as u64)?;
    }
    Ok(())
}
