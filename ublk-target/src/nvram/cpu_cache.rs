//! Making stores to persistent memory durable by writing CPU cache lines back.
//!
//! A device-DAX mapping (`/dev/daxN.M`) is the NVDIMM itself, with no page cache in between,
//! so `msync` has nothing to do (the kernel refuses it). A store is durable once its cache line
//! has left the CPU caches for the memory controller (the ADR domain of an NVDIMM): write each
//! line back with the best instruction the CPU has (CLWB keeps the line cached, CLFLUSHOPT
//! evicts it without serialising, CLFLUSH serialises every line) and then fence, so that no
//! later store — in particular the acknowledgement that follows — is ordered before them.

use std::io;
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Instruction {
    Clwb,
    Clflushopt,
    Clflush,
}

#[derive(Clone, Copy, Debug)]
struct CacheWriteback {
    instruction: Instruction,
    line: usize,
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CacheWriteback {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // Leaf 7 is read only when leaf 0 says it exists. The `unsafe` is for Rust before 1.94,
    // which marked these intrinsics unsafe (our MSRV is older).
    // SAFETY: CPUID exists on every x86_64 CPU.
    #[allow(unused_unsafe)]
    let (leaf7, leaf1) = unsafe {
        (
            (__cpuid(0).eax >= 7).then(|| __cpuid_count(7, 0).ebx),
            __cpuid(1).ebx,
        )
    };
    // CPUID.1:EBX[15:8] is the CLFLUSH line size in 8-byte units; 64 when it is not reported.
    let line = match ((leaf1 >> 8) & 0xff) as usize * 8 {
        0 => 64,
        n => n,
    };
    let instruction = match leaf7 {
        Some(ebx) if ebx & (1 << 24) != 0 => Instruction::Clwb,
        Some(ebx) if ebx & (1 << 23) != 0 => Instruction::Clflushopt,
        _ => Instruction::Clflush,
    };
    CacheWriteback { instruction, line }
}

fn writeback() -> CacheWriteback {
    static DETECTED: OnceLock<CacheWriteback> = OnceLock::new();
    #[cfg(target_arch = "x86_64")]
    {
        *DETECTED.get_or_init(detect)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = &DETECTED;
        unreachable!("supported() is false here")
    }
}

/// Whether this build can make device-DAX stores durable.
pub fn supported() -> bool {
    cfg!(target_arch = "x86_64")
}

/// The instruction that will be used, for logs ("clwb", "clflushopt", "clflush").
pub fn instruction_name() -> &'static str {
    if !supported() {
        return "none";
    }
    match writeback().instruction {
        Instruction::Clwb => "clwb",
        Instruction::Clflushopt => "clflushopt",
        Instruction::Clflush => "clflush",
    }
}

/// Writes the cache lines of `[ptr, ptr+len)` back to memory and fences.
///
/// # Safety
/// The range must be mapped in this process (the instructions fault on an unmapped address).
pub unsafe fn persist(ptr: *const u8, len: usize) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        let wb = writeback();
        let start = (ptr as usize) & !(wb.line - 1);
        let end = ptr as usize + len;
        let mut line = start;
        while line < end {
            // SAFETY: `line` is inside (or at the cache-line start of) the caller's mapped range;
            // these instructions only write the line back, they never change its contents.
            unsafe {
                match wb.instruction {
                    Instruction::Clwb => {
                        std::arch::asm!("clwb [{0}]", in(reg) line, options(nostack, preserves_flags))
                    }
                    Instruction::Clflushopt => std::arch::asm!(
                        "clflushopt [{0}]", in(reg) line, options(nostack, preserves_flags)
                    ),
                    Instruction::Clflush => std::arch::x86_64::_mm_clflush(line as *const u8),
                }
            }
            line += wb.line;
        }
        // SAFETY: a store fence has no operands and no memory effects beyond ordering.
        unsafe { std::arch::x86_64::_mm_sfence() };
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ptr;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "device-DAX NVRAM durability (cache-line write-back) is implemented for x86_64 only",
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn persist_leaves_the_bytes_as_they_were() {
        let mut buf = vec![0u8; 3 * 4096 + 17];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let copy = buf.clone();
        // An unaligned start and length cover partial lines at both ends.
        // SAFETY: the range is inside `buf`.
        unsafe { super::persist(buf.as_ptr().add(5), buf.len() - 9) }.expect("persist");
        assert_eq!(buf, copy);
        assert_ne!(super::instruction_name(), "none");
    }
}
