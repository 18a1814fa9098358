//! Who is who: worker ids and message senders.

use std::fmt;

/// Identifies a worker on its master. Ids are never reused by a reactor, so
/// a stale id is an error, never another worker.
///
/// It prints as `key.serial` and parses back from that, and travels in
/// payloads (as that string), so workers can name each other to the master:
///
/// ```
/// # use clusterphone::WorkerId;
/// let (mut master, id, _end) = clusterphone::Reactor::pair()?;
/// let text = id.to_string();
/// assert_eq!(text.parse::<WorkerId>().unwrap(), id);
/// # Ok::<(), clusterphone::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId {
    pub(crate) key: u32,
    pub(crate) generation: u32,
}

impl WorkerId {
    pub(crate) fn parse(s: &str) -> Option<WorkerId> {
        let (k, g) = s.split_once('.')?;
        let id = WorkerId { key: k.parse().ok()?, generation: g.parse().ok()? };
        // Round trip only: no signs, no leading zeros, no serial 0 (never issued).
        (id.to_string() == s && id.generation != 0).then_some(id)
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

/// A string that is not a worker id (`key.serial`, as [`WorkerId`] prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseWorkerIdError;

impl fmt::Display for ParseWorkerIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a worker id (expected `key.serial`)")
    }
}

impl std::error::Error for ParseWorkerIdError {}

impl std::str::FromStr for WorkerId {
    type Err = ParseWorkerIdError;
    fn from_str(s: &str) -> Result<WorkerId, ParseWorkerIdError> {
        WorkerId::parse(s).ok_or(ParseWorkerIdError)
    }
}

impl serde::Serialize for WorkerId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for WorkerId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<WorkerId, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = WorkerId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a worker id string `key.serial`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<WorkerId, E> {
                WorkerId::parse(v).ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text_and_cbor_and_nothing_else_parses() {
        for id in [WorkerId { key: 0, generation: 1 }, WorkerId { key: 7, generation: u32::MAX }] {
            assert_eq!(id.to_string().parse::<WorkerId>(), Ok(id));
            let mut cbor = Vec::new();
            ciborium::into_writer(&id, &mut cbor).unwrap();
            assert_eq!(ciborium::from_reader::<WorkerId, _>(&cbor[..]).unwrap(), id);
        }
        for bad in ["", "1", "1.", ".1", "1.0", "01.2", "1.02", "+1.2", "1.2.3", "-1.2", "4294967296.1", " 1.2"] {
            assert_eq!(bad.parse::<WorkerId>(), Err(ParseWorkerIdError), "{bad:?}");
        }
        let mut cbor = Vec::new();
        ciborium::into_writer(&"x.y", &mut cbor).unwrap();
        assert!(ciborium::from_reader::<WorkerId, _>(&cbor[..]).is_err());
    }
}
