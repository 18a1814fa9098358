//! Any number of listeners of one kind (worker events, unhandled messages),
//! each taken out of its slot while it runs, so it may add or remove
//! listeners (itself included) without any shared borrow.

use slab::Slab;

/// Names a listener added with `Reactor::add_worker_listener` or
/// `Reactor::add_unhandled_listener`, to remove it with `Reactor::remove_listener`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub(crate) kind: ListenerKind,
    pub(crate) index: usize,
    pub(crate) generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ListenerKind {
    Worker,
    Unhandled,
}

struct Slot<H> {
    generation: u64,
    /// `None` while it runs.
    listener: Option<H>,
}

pub(crate) struct Listeners<H> {
    kind: ListenerKind,
    slots: Slab<Slot<H>>,
    next_generation: u64,
}

impl<H> Listeners<H> {
    pub(crate) fn new(kind: ListenerKind) -> Self {
        Listeners { kind, slots: Slab::new(), next_generation: 0 }
    }

    pub(crate) fn add(&mut self, listener: H) -> ListenerKey {
        self.next_generation += 1;
        let generation = self.next_generation;
        let index = self.slots.insert(Slot { generation, listener: Some(listener) });
        ListenerKey { kind: self.kind, index, generation }
    }

    pub(crate) fn remove(&mut self, key: ListenerKey) -> bool {
        let found = key.kind == self.kind && self.slots.get(key.index).is_some_and(|s| s.generation == key.generation);
        if found {
            self.slots.remove(key.index);
        }
        found
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The listeners present now, in the order they were added.
    pub(crate) fn keys(&self) -> Vec<ListenerKey> {
        let mut keys: Vec<ListenerKey> = self
            .slots
            .iter()
            .map(|(index, s)| ListenerKey { kind: self.kind, index, generation: s.generation })
            .collect();
        keys.sort_by_key(|k| k.generation);
        keys
    }

    /// Takes a listener out to run it (`None` if removed meanwhile).
    pub(crate) fn take(&mut self, key: ListenerKey) -> Option<H> {
        self.slots.get_mut(key.index).filter(|s| s.generation == key.generation)?.listener.take()
    }

    /// Puts a listener back after it ran, unless it was removed meanwhile.
    pub(crate) fn restore(&mut self, key: ListenerKey, listener: H) {
        if let Some(slot) = self.slots.get_mut(key.index).filter(|s| s.generation == key.generation) {
            slot.listener = Some(listener);
        }
    }
}
