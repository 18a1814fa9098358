//! The handler table: namespaces of commands, each a boxed callback.
//!
//! A handler is taken out of its slot while it runs, so it can freely use the
//! reactor (send, register, remove, even replace itself) without any shared
//! borrow; afterwards it is put back only if its slot was left untouched.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::OwnedFd;

use crate::ack::Responder;
use crate::id::Peer;

/// FxHash: names are short and SipHash costs more than the whole lookup.
/// Only our own registrations are inserted, so a peer's names cannot flood
/// the table with collisions (hash-DoS needs inserts).
#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The namespace used when none is named.
pub const DEFAULT_NAMESPACE: &str = "_";
/// Namespace names starting with this are the library's own.
pub const RESERVED_PREFIX: &str = "__clusterphone";

/// A message as the reactor hands it to a stored handler, payload undecoded.
pub(crate) struct Incoming<'a> {
    pub(crate) from: Peer,
    pub(crate) ns: &'a str,
    pub(crate) cmd: &'a str,
    pub(crate) payload: &'a [u8],
    pub(crate) fd: Option<OwnedFd>,
    pub(crate) responder: Responder,
}

struct Slot<H> {
    generation: u64,
    /// `None` while the handler runs.
    handler: Option<H>,
}

/// What a lookup found.
pub(crate) enum Lookup<H> {
    /// The handler, taken out of its slot, and the key to put it back with.
    Found(H, SlotKey),
    /// Running already (cannot happen: nested polls are refused).
    Busy,
    NoHandler,
    UnknownNamespace,
}

/// Where a taken handler goes back: its slot, checked by generation so a
/// slot that was removed or replaced meanwhile is never refilled.
#[derive(Clone, Copy)]
pub(crate) struct SlotKey {
    index: usize,
    generation: u64,
}

/// Handlers live in a slab; names map to slab indices, so putting a handler
/// back after it ran needs no second lookup.
/// `H` is the stored callback type (the reactor's boxed closure).
pub(crate) struct Handlers<H> {
    spaces: FxMap<String, FxMap<String, usize>>,
    slots: slab::Slab<Slot<H>>,
    next_generation: u64,
}

impl<H> Default for Handlers<H> {
    fn default() -> Self {
        Handlers { spaces: FxMap::default(), slots: slab::Slab::new(), next_generation: 0 }
    }
}

pub(crate) fn check_namespace(ns: &str) -> Result<(), crate::error::Error> {
    if ns.is_empty() {
        Err(crate::error::Error::EmptyNamespace)
    } else if ns.starts_with(RESERVED_PREFIX) {
        Err(crate::error::Error::ReservedNamespace)
    } else if ns.len() > crate::config::MAX_NAMESPACE_LEN {
        Err(crate::error::Error::NameTooLong)
    } else {
        Ok(())
    }
}

pub(crate) fn check_command(cmd: &str) -> Result<(), crate::error::Error> {
    if cmd.is_empty() {
        Err(crate::error::Error::EmptyCommand)
    } else if cmd.len() > u16::MAX as usize {
        Err(crate::error::Error::NameTooLong)
    } else {
        Ok(())
    }
}

impl<H> Handlers<H> {
    /// Registers (or replaces) a handler; returns true if the namespace is new.
    pub(crate) fn insert(&mut self, ns: &str, cmd: &str, handler: H) -> bool {
        self.next_generation += 1;
        let slot = Slot { generation: self.next_generation, handler: Some(handler) };
        let new_space = !self.spaces.contains_key(ns);
        let space = self.spaces.entry(ns.to_owned()).or_default();
        match space.get(cmd) {
            // Replacing: a fresh generation, so a running old handler is not put back.
            Some(&index) => self.slots[index] = slot,
            None => {
                space.insert(cmd.to_owned(), self.slots.insert(slot));
            }
        }
        new_space
    }

    /// Removes a handler; returns whether there was one.
    pub(crate) fn remove(&mut self, ns: &str, cmd: &str) -> bool {
        let Some(space) = self.spaces.get_mut(ns) else { return false };
        let Some(index) = space.remove(cmd) else { return false };
        self.slots.remove(index);
        if space.is_empty() {
            self.spaces.remove(ns);
        }
        true
    }

    pub(crate) fn has_namespace(&self, ns: &str) -> bool {
        self.spaces.contains_key(ns)
    }

    pub(crate) fn namespace_count(&self) -> usize {
        self.spaces.len()
    }

    pub(crate) fn contains(&self, ns: &str, cmd: &str) -> bool {
        self.spaces.get(ns).is_some_and(|s| s.contains_key(cmd))
    }

    pub(crate) fn namespaces(&self) -> Vec<String> {
        self.spaces.keys().cloned().collect()
    }

    /// Takes the handler for (ns, cmd) out to run it.
    pub(crate) fn take(&mut self, ns: &str, cmd: &str) -> Lookup<H> {
        let Some(space) = self.spaces.get(ns) else { return Lookup::UnknownNamespace };
        let Some(&index) = space.get(cmd) else { return Lookup::NoHandler };
        let slot = &mut self.slots[index];
        match slot.handler.take() {
            Some(h) => Lookup::Found(h, SlotKey { index, generation: slot.generation }),
            None => Lookup::Busy,
        }
    }

    /// Puts a handler back after it ran, unless it was replaced or removed meanwhile.
    pub(crate) fn restore(&mut self, key: SlotKey, handler: H) {
        if let Some(slot) = self.slots.get_mut(key.index) {
            if slot.generation == key.generation && slot.handler.is_none() {
                slot.handler = Some(handler);
            }
        }
    }
}
