//! Little-endian primitive fields: a writer, and a bounds-checked reader that never panics and
//! never reads past its input. The message-level fields (hellos, resync points, text) are in
//! `msg`.

use crate::error::FrameError;

pub(super) struct W<'a>(pub(super) &'a mut Vec<u8>);

impl W<'_> {
    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(super) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
}

pub(super) struct R<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
    /// What is being read, for error messages.
    pub(super) what: &'static str,
}

impl R<'_> {
    pub(super) fn bad(&self, detail: String) -> FrameError {
        FrameError::Malformed {
            what: self.what,
            detail,
        }
    }
    pub(super) fn take(&mut self, n: usize) -> Result<&[u8], FrameError> {
        if self.buf.len() - self.pos < n {
            return Err(self.bad(format!("truncated at byte {} (needs {n} more)", self.pos)));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub(super) fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub(super) fn u32(&mut self) -> Result<u32, FrameError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    pub(super) fn u64(&mut self) -> Result<u64, FrameError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub(super) fn arr32(&mut self) -> Result<[u8; 32], FrameError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
}
