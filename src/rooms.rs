//! The live room registry, owned by the reactor thread.
//!
//! A room is here while it has members or messages on their way to the store;
//! the store knows every room, this registry only the active ones. Members are
//! kept in a `Slab` of connection tokens, so joining and leaving are O(1) and a
//! broadcast walks one dense list. Each room also holds its group-commit state:
//! the messages waiting for the next batch and whether a batch is being stored.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use slab::Slab;

use crate::store::{NewMessage, StoreResult, StoredMessage};

/// Which connection a message came from: the slab token and the connection's
/// unique id (tokens are reused, ids are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub token: usize,
    pub id: u64,
}

/// A message accepted from a member, waiting for its batch.
pub struct Pending {
    pub sender: ConnRef,
    pub msg: NewMessage,
    /// When the reactor read it.
    pub arrived: Instant,
}

/// A join whose history came back while the room had a batch in flight;
/// applied once that batch is broadcast.
pub struct DeferredJoin {
    pub conn: ConnRef,
    pub since: Option<i64>,
    pub result: StoreResult<Vec<StoredMessage>>,
}

pub struct Room {
    /// Unique for the life of the process; a completion for a room that was
    /// dropped and re-created under the same slab key is recognised by it.
    pub id: u64,
    pub name: Rc<str>,
    pub members: Slab<usize>,
    pub pending: Vec<Pending>,
    /// A batch of this room is being written.
    pub inflight: bool,
    /// The store has confirmed the room exists (a join created or found it).
    /// Batches wait until then, so they never race the room's creation.
    pub confirmed: bool,
    /// Queued in the reactor's list of rooms to submit.
    pub dirty: bool,
    /// Newest timestamp handed out, so timestamps never go backwards in a room.
    pub last_ts: i64,
    /// Joins waiting for the batch in flight (see [`DeferredJoin`]).
    pub deferred_joins: Vec<DeferredJoin>,
    /// Deletes of this room being carried out by the store. Meanwhile no
    /// batch is submitted and nobody joins, so that nothing of this room
    /// can be written after the delete into a room created again under the
    /// same name.
    pub deleting: u32,
    /// Deleted while a batch was in flight: the entry stays, empty and
    /// closed to joins, until that batch is done, for the same reason.
    pub tombstone: bool,
}

impl Room {
    /// Nothing left that needs this entry.
    pub fn is_idle(&self) -> bool {
        self.members.is_empty() && self.pending.is_empty() && !self.inflight && self.deleting == 0
    }
}

#[derive(Default)]
pub struct Rooms {
    slab: Slab<Room>,
    by_name: HashMap<Rc<str>, usize>,
    next_id: u64,
}

impl Rooms {
    /// Add connection `token` to room `name`, creating the entry when needed.
    /// Returns the room's key and the member's key.
    pub fn join(&mut self, name: &str, token: usize) -> (usize, usize) {
        let key = self.entry(name);
        let member = self.slab[key].members.insert(token);
        (key, member)
    }

    /// A delete of room `name` goes to the store: fence its entry (made for
    /// the purpose if the room has none) until the outcome is back.
    pub fn begin_delete(&mut self, name: &str) {
        let key = self.entry(name);
        self.slab[key].deleting += 1;
    }

    /// The outcome of a delete is back: lift one fence. Returns the entry's
    /// key if it is still there.
    pub fn end_delete(&mut self, name: &str) -> Option<usize> {
        let key = self.key_of(name)?;
        let room = &mut self.slab[key];
        room.deleting = room.deleting.saturating_sub(1);
        self.drop_if_idle(key);
        self.key_of(name)
    }

    /// The entry of room `name`, created when there is none.
    fn entry(&mut self, name: &str) -> usize {
        match self.by_name.get(name) {
            Some(&k) => k,
            None => {
                self.next_id += 1;
                let name: Rc<str> = Rc::from(name);
                let key = self.slab.insert(Room {
                    id: self.next_id,
                    name: name.clone(),
                    members: Slab::new(),
                    pending: Vec::new(),
                    inflight: false,
                    confirmed: false,
                    dirty: false,
                    last_ts: 0,
                    deferred_joins: Vec::new(),
                    deleting: 0,
                    tombstone: false,
                });
                self.by_name.insert(name, key);
                key
            }
        }
    }

    /// Remove a member; the room goes when nothing needs it any more.
    pub fn leave(&mut self, key: usize, member: usize) {
        if let Some(room) = self.slab.get_mut(key) {
            room.members.try_remove(member);
        }
        self.drop_if_idle(key);
    }

    pub fn drop_if_idle(&mut self, key: usize) {
        if self.slab.get(key).is_some_and(Room::is_idle) {
            self.remove(key);
        }
    }

    /// Take a room out of the registry.
    pub fn remove(&mut self, key: usize) -> Option<Room> {
        let room = self.slab.try_remove(key)?;
        self.by_name.remove(&room.name);
        Some(room)
    }

    pub fn key_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn get(&self, key: usize) -> Option<&Room> {
        self.slab.get(key)
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut Room> {
        self.slab.get_mut(key)
    }

    /// The room at `key` if it is still the one with `id`.
    pub fn get_live(&mut self, key: usize, id: u64) -> Option<&mut Room> {
        self.slab.get_mut(key).filter(|r| r.id == id)
    }

    /// Live members of room `name`.
    pub fn member_count(&self, name: &str) -> usize {
        self.key_of(name)
            .and_then(|k| self.slab.get(k))
            .map_or(0, |r| r.members.len())
    }

    /// Every room with members here, with how many.
    pub fn member_counts(&self) -> HashMap<String, u64> {
        self.slab
            .iter()
            .filter(|(_, r)| !r.members.is_empty())
            .map(|(_, r)| (r.name.to_string(), r.members.len() as u64))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Whether any room still has messages that are not stored.
    pub fn has_unstored(&self) -> bool {
        self.slab
            .iter()
            .any(|(_, r)| r.inflight || !r.pending.is_empty())
    }

    pub fn keys(&self) -> Vec<usize> {
        self.slab.iter().map(|(k, _)| k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_leave_and_cleanup() {
        let mut rooms = Rooms::default();
        let (k1, m1) = rooms.join("General", 7);
        let (k2, m2) = rooms.join("General", 9);
        assert_eq!(k1, k2);
        assert_eq!(rooms.member_count("General"), 2);
        rooms.leave(k1, m1);
        assert_eq!(rooms.member_count("General"), 1);
        rooms.get_mut(k1).unwrap().inflight = true;
        rooms.leave(k2, m2);
        assert_eq!(rooms.len(), 1, "a room with a batch in flight stays");
        rooms.get_mut(k1).unwrap().inflight = false;
        rooms.drop_if_idle(k1);
        assert!(rooms.is_empty());
        assert!(rooms.key_of("General").is_none());
        let (k3, _) = rooms.join("General", 1);
        assert_ne!(
            rooms.get(k3).unwrap().id,
            1,
            "a new incarnation gets a new id"
        );
    }
}
