//! Who is who: worker ids and message senders.

use std::fmt;

/// Identifies a worker on its master. Ids are never reused by a reactor, so
/// a stale id is an error, never another worker.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId {
    pub(crate) key: u32,
    pub(crate) generation: u32,
}

impl WorkerId {
    pub(crate) fn parse(s: &str) -> Option<WorkerId> {
        let (k, g) = s.split_once('.')?;
        Some(WorkerId { key: k.parse().ok()?, generation: g.parse().ok()? })
    }

    /// A number unique among the workers of one master (1, 2, 3, …).
    pub fn serial(&self) -> u32 {
        self.generation
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkerId({self})")
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.key, self.generation)
    }
}

impl WorkerId {
    /// The worker's slot in its master's link table.
    pub(crate) fn index(self) -> usize {
        self.key as usize
    }
}

/// Who sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// The master (as seen by a worker).
    Master,
    /// A worker (as seen by the master).
    Worker(WorkerId),
}
