//! The one state interface of every component with state (the serial port,
//! the i8042, virtio transports and devices, the vCPUs, the in-kernel
//! irqchip, PIT and kvmclock): save the state as a versioned, serializable
//! value, restore from one.
//!
//! A component implements [`Persist`] in its own file. The machine keeps
//! its components in a list under stable ids and saves or restores them by
//! walking that list ([`Component`] is the object-safe face of `Persist`
//! the walk uses); the saved form of each is a [`ComponentState`]: id, kind,
//! version and the state as JSON. docs/formats.md describes how these land
//! in a snapshot's state.bin.
//!
//! Quiescing (finishing or holding in-flight I/O) is separate: the caller
//! quiesces a device before it saves it.
//!
//! Versions: a component bumps [`Persist::VERSION`] when its state changes
//! in a way older readers would misread, and converts older states in
//! [`Persist::upgrade`]. Fields added with `#[serde(default)]` need no bump
//! (unknown fields are ignored on reading, missing ones take their default).

use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A component's state as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentState {
    /// The component's id in the machine (e.g. "serial0", "disk1").
    pub id: String,
    /// What it is ([`Persist::KIND`], e.g. "uart-16550a").
    pub kind: String,
    /// The version of its state's layout ([`Persist::VERSION`]).
    pub version: u32,
    /// The state itself.
    pub state: serde_json::Value,
}

/// Errors saving or restoring a component's state; each names the
/// component.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The component could not produce its state.
    #[error("{id}: cannot save its state: {source}")]
    Save {
        /// The component.
        id: String,
        /// What failed.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The component could not take the saved state.
    #[error("{id}: cannot restore its state: {source}")]
    Restore {
        /// The component.
        id: String,
        /// What failed.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The saved state belongs to another kind of component.
    #[error("{id}: the saved state is of a {found}, not of a {expected}")]
    Kind {
        /// The component.
        id: String,
        /// Its kind.
        expected: String,
        /// The kind in the snapshot.
        found: String,
    },
    /// The saved state is newer than this snapvm understands.
    #[error("{id}: its saved state has version {found}, written by a newer snapvm (this one reads {kind} states up to version {supported})")]
    TooNew {
        /// The component.
        id: String,
        /// Its kind.
        kind: String,
        /// The version in the snapshot.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The saved state does not decode (or cannot be upgraded).
    #[error("{id}: invalid saved {kind} state (version {version}): {message}")]
    Invalid {
        /// The component.
        id: String,
        /// Its kind.
        kind: String,
        /// The version in the snapshot.
        version: u32,
        /// What is wrong.
        message: String,
    },
    /// The snapshot has no state for a component of the machine.
    #[error("the snapshot has no state for {0}")]
    Missing(String),
    /// The snapshot has state for a component the machine does not have.
    #[error("the snapshot has state for {0}, which this machine does not have")]
    Unexpected(String),
}

/// Saving and restoring a component's state.
pub trait Persist {
    /// The state, as saved.
    type State: Serialize + DeserializeOwned + Send + 'static;
    /// What can go wrong saving or restoring it.
    type Error: std::error::Error + Send + Sync + 'static;
    /// What the component is; saved with the state and checked on restore.
    const KIND: &'static str;
    /// The layout version of [`Persist::State`].
    const VERSION: u32;

    /// The component's state now (a device is quiesced first).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Replaces the component's state with `state`.
    fn restore(&mut self, state: Self::State) -> Result<(), Self::Error>;

    /// Checks, without changing anything, that `state` fits this component
    /// (an apply checks every component before it restores any). The
    /// default accepts every state that decodes.
    fn check(&self, state: &Self::State) -> Result<(), Self::Error> {
        let _ = state;
        Ok(())
    }

    /// Converts a state saved with layout `version` (older than
    /// [`Persist::VERSION`]) to the current layout. The default knows no
    /// older layout.
    fn upgrade(version: u32, state: serde_json::Value) -> Result<serde_json::Value, String> {
        let _ = state;
        Err(format!("no conversion from version {version}"))
    }
}

/// A state not encoded yet: what [`Persist::save`] returned, as any type.
trait Encode: Send {
    fn encode(&self) -> Result<serde_json::Value, serde_json::Error>;
}

impl<T: Serialize + Send> Encode for T {
    fn encode(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(self)
    }
}

/// A component's state as saved, not encoded yet: a live snapshot saves
/// states inside the guest's pause and encodes them after it.
pub struct SavedState {
    id: String,
    kind: &'static str,
    version: u32,
    state: Box<dyn Encode>,
}

impl SavedState {
    /// The component's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Encodes the state as a [`ComponentState`].
    pub fn encode(&self) -> Result<ComponentState, StateError> {
        let state = self.state.encode().map_err(|e| StateError::Save {
            id: self.id.clone(),
            source: Box::new(e),
        })?;
        Ok(ComponentState {
            id: self.id.clone(),
            kind: self.kind.to_string(),
            version: self.version,
            state,
        })
    }
}

/// Saves `value`'s state under `id` (not encoded yet).
pub fn save_as<T: Persist>(value: &T, id: &str) -> Result<SavedState, StateError> {
    let state = value.save().map_err(|e| StateError::Save {
        id: id.to_string(),
        source: Box::new(e),
    })?;
    Ok(SavedState {
        id: id.to_string(),
        kind: T::KIND,
        version: T::VERSION,
        state: Box::new(state),
    })
}

/// Decodes `saved` (checking kind and version, upgrading older layouts)
/// into `T`'s state.
pub fn decode<T: Persist>(saved: &ComponentState) -> Result<T::State, StateError> {
    let id = saved.id.clone();
    if saved.kind != T::KIND {
        return Err(StateError::Kind {
            id,
            expected: T::KIND.into(),
            found: saved.kind.clone(),
        });
    }
    let invalid = |message: String| StateError::Invalid {
        id: saved.id.clone(),
        kind: T::KIND.into(),
        version: saved.version,
        message,
    };
    let data = match saved.version {
        v if v > T::VERSION => {
            return Err(StateError::TooNew {
                id,
                kind: T::KIND.into(),
                found: v,
                supported: T::VERSION,
            })
        }
        v if v == T::VERSION => saved.state.clone(),
        v => T::upgrade(v, saved.state.clone()).map_err(invalid)?,
    };
    serde_json::from_value(data).map_err(|e| invalid(e.to_string()))
}

/// Checks that `saved` decodes and fits `value` ([`Persist::check`]).
pub fn check_against<T: Persist>(value: &T, saved: &ComponentState) -> Result<(), StateError> {
    let state = decode::<T>(saved)?;
    value.check(&state).map_err(|e| StateError::Restore {
        id: saved.id.clone(),
        source: Box::new(e),
    })
}

/// Restores `value` from `saved`.
pub fn restore_from<T: Persist>(value: &mut T, saved: &ComponentState) -> Result<(), StateError> {
    let state = decode::<T>(saved)?;
    value.restore(state).map_err(|e| StateError::Restore {
        id: saved.id.clone(),
        source: Box::new(e),
    })
}

/// [`Persist`] without its associated types, for components held as trait
/// objects (a virtio transport's device). Every `Persist` type has it.
pub trait PersistDyn {
    /// Saves the state under `id`.
    fn save_dyn(&self, id: &str) -> Result<SavedState, StateError>;
    /// Restores it from `saved`.
    fn restore_dyn(&mut self, saved: &ComponentState) -> Result<(), StateError>;
    /// Checks that `saved` fits.
    fn check_dyn(&self, saved: &ComponentState) -> Result<(), StateError>;
}

impl<T: Persist> PersistDyn for T {
    fn save_dyn(&self, id: &str) -> Result<SavedState, StateError> {
        save_as(self, id)
    }

    fn check_dyn(&self, saved: &ComponentState) -> Result<(), StateError> {
        check_against(self, saved)
    }

    fn restore_dyn(&mut self, saved: &ComponentState) -> Result<(), StateError> {
        restore_from(self, saved)
    }
}

/// A registered component, shared with the buses and threads that drive
/// it: the object-safe face of [`Persist`] the machine's walk uses.
pub trait Component: Send + Sync {
    /// Saves the component's state under `id`.
    fn save_state(&self, id: &str) -> Result<SavedState, StateError>;
    /// Restores it from `saved`.
    fn restore_state(&self, saved: &ComponentState) -> Result<(), StateError>;
    /// Checks that `saved` fits, changing nothing.
    fn check_state(&self, saved: &ComponentState) -> Result<(), StateError>;
}

impl<T: PersistDyn + Send> Component for Mutex<T> {
    fn save_state(&self, id: &str) -> Result<SavedState, StateError> {
        self.lock().unwrap_or_else(|e| e.into_inner()).save_dyn(id)
    }

    fn check_state(&self, saved: &ComponentState) -> Result<(), StateError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .check_dyn(saved)
    }

    fn restore_state(&self, saved: &ComponentState) -> Result<(), StateError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_dyn(saved)
    }
}

/// Encodes saved states, in order.
pub fn encode_all(saved: &[SavedState]) -> Result<Vec<ComponentState>, StateError> {
    saved.iter().map(SavedState::encode).collect()
}

/// A machine's components, in the order they are saved and restored.
#[derive(Default, Clone)]
pub struct Components {
    list: Vec<(String, Arc<dyn Component>)>,
}

impl Components {
    /// No components.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `component` under `id` (unique), after those already
    /// registered.
    pub fn register(&mut self, id: impl Into<String>, component: Arc<dyn Component>) {
        let id = id.into();
        debug_assert!(
            self.list.iter().all(|(i, _)| *i != id),
            "component id {id} registered twice"
        );
        self.list.push((id, component));
    }

    /// The ids, in order.
    pub fn ids(&self) -> Vec<&str> {
        self.list.iter().map(|(i, _)| i.as_str()).collect()
    }

    /// Saves every component, in order (encode them with
    /// [`encode_all`] once the hurry is over).
    pub fn save_all(&self) -> Result<Vec<SavedState>, StateError> {
        self.list.iter().map(|(id, c)| c.save_state(id)).collect()
    }

    /// Checks, changing nothing, that `saved` has exactly one state for
    /// each component (and nothing else) and that each fits its component.
    pub fn check(&self, saved: &[ComponentState]) -> Result<(), StateError> {
        for s in saved {
            if !self.list.iter().any(|(id, _)| *id == s.id) {
                return Err(StateError::Unexpected(s.id.clone()));
            }
        }
        for (id, c) in &self.list {
            let s = saved
                .iter()
                .find(|s| s.id == *id)
                .ok_or_else(|| StateError::Missing(id.clone()))?;
            c.check_state(s)?;
        }
        Ok(())
    }

    /// Restores every component from its entry in `saved`, in registration
    /// order (not the order of `saved`). Call [`Components::check`] first:
    /// a state that fails here leaves the components before it restored.
    pub fn restore_all(&self, saved: &[ComponentState]) -> Result<(), StateError> {
        for (id, c) in &self.list {
            let s = saved
                .iter()
                .find(|s| s.id == *id)
                .ok_or_else(|| StateError::Missing(id.clone()))?;
            c.restore_state(s)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter whose layout changed: version 1 saved `{"n": N}`, version
    /// 2 saves `{"count": N, "label": ...}`.
    #[derive(Default)]
    struct Counter {
        count: u64,
        label: String,
    }

    #[derive(Serialize, Deserialize)]
    struct CounterState {
        count: u64,
        #[serde(default)]
        label: String,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("counters cannot go down")]
    struct Down;

    impl Persist for Counter {
        type State = CounterState;
        type Error = Down;
        const KIND: &'static str = "counter";
        const VERSION: u32 = 2;

        fn save(&self) -> Result<CounterState, Down> {
            Ok(CounterState {
                count: self.count,
                label: self.label.clone(),
            })
        }

        fn restore(&mut self, s: CounterState) -> Result<(), Down> {
            if s.count < self.count {
                return Err(Down);
            }
            self.count = s.count;
            self.label = s.label;
            Ok(())
        }

        fn upgrade(version: u32, state: serde_json::Value) -> Result<serde_json::Value, String> {
            match version {
                1 => Ok(serde_json::json!({ "count": state["n"] })),
                v => Err(format!("no conversion from version {v}")),
            }
        }
    }

    fn registry(c: &Arc<Mutex<Counter>>) -> Components {
        let mut all = Components::new();
        all.register("c0", c.clone() as Arc<dyn Component>);
        all
    }

    #[test]
    fn round_trip_through_the_walk() {
        let c = Arc::new(Mutex::new(Counter {
            count: 3,
            label: "x".into(),
        }));
        let all = registry(&c);
        let saved = encode_all(&all.save_all().unwrap()).unwrap();
        assert_eq!(saved.len(), 1);
        assert_eq!((saved[0].kind.as_str(), saved[0].version), ("counter", 2));
        c.lock().unwrap().label.clear();
        all.restore_all(&saved).unwrap();
        assert_eq!(c.lock().unwrap().label, "x");
    }

    #[test]
    fn older_layouts_are_upgraded_and_unknown_fields_ignored() {
        let c = Arc::new(Mutex::new(Counter::default()));
        let all = registry(&c);
        let v1 = ComponentState {
            id: "c0".into(),
            kind: "counter".into(),
            version: 1,
            state: serde_json::json!({ "n": 7 }),
        };
        all.restore_all(&[v1]).unwrap();
        assert_eq!(c.lock().unwrap().count, 7);
        let extra = ComponentState {
            id: "c0".into(),
            kind: "counter".into(),
            version: 2,
            state: serde_json::json!({ "count": 9, "added_later": true }),
        };
        all.restore_all(&[extra]).unwrap();
        assert_eq!(c.lock().unwrap().count, 9);
    }

    #[test]
    fn mismatches_are_refused_with_the_component_named() {
        let c = Arc::new(Mutex::new(Counter::default()));
        let all = registry(&c);
        let good = encode_all(&all.save_all().unwrap()).unwrap().remove(0);
        let err = |s: ComponentState| {
            all.check(std::slice::from_ref(&s))
                .and_then(|()| all.restore_all(&[s]))
                .unwrap_err()
                .to_string()
        };
        let mut newer = good.clone();
        newer.version = 3;
        let e = err(newer);
        assert!(e.contains("c0") && e.contains("newer snapvm"), "{e}");
        let mut other = good.clone();
        other.kind = "uart".into();
        assert!(err(other).contains("not of a counter"));
        let mut bad = good.clone();
        bad.state = serde_json::json!({ "count": "many" });
        assert!(err(bad).contains("invalid saved counter state"));
        let mut stranger = good.clone();
        stranger.id = "c9".into();
        assert!(err(stranger).contains("c9, which this machine does not have"));
        assert!(all
            .check(&[])
            .unwrap_err()
            .to_string()
            .contains("no state for c0"));
        c.lock().unwrap().count = 100;
        let e = err(good);
        assert!(
            e.contains("c0: cannot restore") && e.contains("go down"),
            "{e}"
        );
    }
}
