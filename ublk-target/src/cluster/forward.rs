//! Forwarding: I/O to a range another node owns goes to that node as a request (see
//! [`super::wire`]) and comes back as its answer.

use super::wire;
use std::future::Future;
use std::pin::Pin;

pub type ForwardFuture<T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send>>;

/// Sends I/O for ranges the partner owns to the partner.
pub trait Forwarder: Send + Sync {
    /// `data` is copied once, into the request, before this returns.
    fn write(&self, lun: u32, offset: u64, data: &[u8]) -> ForwardFuture<()>;
    fn write_zeroes(&self, lun: u32, offset: u64, len: u64) -> ForwardFuture<()>;
    fn read(&self, lun: u32, offset: u64, len: u32) -> ForwardFuture<Vec<u8>>;
    /// Bytes of the partner's medium (not its data path): for a read our medium path failed.
    fn read_medium(&self, lun: u32, offset: u64, len: u32) -> ForwardFuture<Vec<u8>>;
    /// Each node its own medium, and ours failed a flush batch of `partition`: the partner
    /// writes these records (see [`wire::OP_WRITE_RECORDS_FOR_PARTNER`]) to its medium.
    fn write_records(
        &self,
        partition: u32,
        through_seq: u64,
        chunk_flags: u32,
        records: Vec<u8>,
    ) -> ForwardFuture<()>;
    /// Each node its own medium: the partner writes every copy it holds of our `partition`
    /// through `through_seq` to its medium (see [`wire::OP_WRITE_HELD_FOR_PARTNER`]).
    fn write_held(&self, partition: u32, through_seq: u64) -> ForwardFuture<()>;
    /// We keep writing to `range` of `lun`, which the partner owns: ask it to hand the range
    /// over (see [`wire::OP_ASK_FOR_RANGE`]).
    fn ask_for_range(&self, lun: u32, range: u32) -> ForwardFuture<()>;
    /// Ranges moved: the partner re-reads the ownership table (see
    /// [`wire::OP_RELOAD_OWNERSHIP`]).
    fn reload_ownership(&self) -> ForwardFuture<()>;
    /// Asks the partner for a read lease (see [`wire::OP_READ_LEASE`]); the raw answer.
    fn read_lease(&self) -> ForwardFuture<Vec<u8>>;
}

/// A [`Forwarder`] over any request/response channel: `call` carries an encoded request to
/// the owner and brings back its raw answer (see [`wire`]).
pub struct RequestForwarder<C>(pub C);

impl<C> RequestForwarder<C>
where
    C: Fn(Vec<u8>) -> ForwardFuture<Vec<u8>> + Send + Sync,
{
    fn ask(&self, req: Vec<u8>) -> ForwardFuture<Vec<u8>> {
        let answer = (self.0)(req);
        Box::pin(async move { wire::answer(&answer.await?).map(|d| d.to_vec()) })
    }
}

impl<C> Forwarder for RequestForwarder<C>
where
    C: Fn(Vec<u8>) -> ForwardFuture<Vec<u8>> + Send + Sync,
{
    fn write(&self, lun: u32, offset: u64, data: &[u8]) -> ForwardFuture<()> {
        let f = self.ask(wire::encode(
            wire::OP_WRITE,
            lun,
            offset,
            data.len() as u32,
            data,
        ));
        Box::pin(async move { f.await.map(|_| ()) })
    }
    fn write_zeroes(&self, lun: u32, offset: u64, len: u64) -> ForwardFuture<()> {
        let f = self.ask(wire::encode(wire::OP_ZERO, lun, offset, len as u32, &[]));
        Box::pin(async move { f.await.map(|_| ()) })
    }
    fn read(&self, lun: u32, offset: u64, len: u32) -> ForwardFuture<Vec<u8>> {
        self.ask(wire::encode(wire::OP_READ, lun, offset, len, &[]))
    }
    fn read_medium(&self, lun: u32, offset: u64, len: u32) -> ForwardFuture<Vec<u8>> {
        self.ask(wire::encode(wire::OP_READ_MEDIUM, lun, offset, len, &[]))
    }
    fn write_records(
        &self,
        partition: u32,
        through_seq: u64,
        chunk_flags: u32,
        records: Vec<u8>,
    ) -> ForwardFuture<()> {
        let f = self.ask(wire::encode(
            wire::OP_WRITE_RECORDS_FOR_PARTNER,
            partition,
            through_seq,
            chunk_flags,
            &records,
        ));
        Box::pin(async move { f.await.map(|_| ()) })
    }
    fn write_held(&self, partition: u32, through_seq: u64) -> ForwardFuture<()> {
        let f = self.ask(wire::encode(
            wire::OP_WRITE_HELD_FOR_PARTNER,
            partition,
            through_seq,
            0,
            &[],
        ));
        Box::pin(async move { f.await.map(|_| ()) })
    }
    fn ask_for_range(&self, lun: u32, range: u32) -> ForwardFuture<()> {
        let f = self.ask(wire::encode(
            wire::OP_ASK_FOR_RANGE,
            lun,
            u64::from(range),
            0,
            &[],
        ));
        Box::pin(async move { f.await.map(|_| ()) })
    }
    fn reload_ownership(&self) -> ForwardFuture<()> {
        let f = self.ask(wire::encode(wire::OP_RELOAD_OWNERSHIP, 0, 0, 0, &[]));
        Box::pin(async move { f.await.map(|_| ()) })
    }
    fn read_lease(&self) -> ForwardFuture<Vec<u8>> {
        self.ask(wire::encode(wire::OP_READ_LEASE, 0, 0, 0, &[]))
    }
}
