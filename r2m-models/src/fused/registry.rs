//! Backend-specific ops, found by type at run time.
//!
//! Model code is generic over `B: Backend` and cannot name what `B` is made of (`Autodiff<I>`'s
//! `I`, or a cubecl runtime). The program that picks the backend files a table of function
//! pointers for it here (`Ops<B>`, a type generic over the backend, so each backend's table has a
//! `TypeId` of its own), and the functions in `fused` look it up. A backend without a table runs
//! the tensor ops, which compute the same values.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

/// `TypeId` of an ops table -> the table.
fn tables() -> &'static RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>> {
    static TABLES: OnceLock<RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>>> = OnceLock::new();
    TABLES.get_or_init(Default::default)
}

/// File `ops`; a second call for the same type replaces the first.
pub(super) fn register<T: Any + Send + Sync>(ops: T) {
    tables()
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .insert(TypeId::of::<T>(), Box::new(ops));
}

/// The table of type `T`, if one was filed.
pub(super) fn lookup<T: Any + Copy>() -> Option<T> {
    let map = tables()
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    map.get(&TypeId::of::<T>())?.downcast_ref::<T>().copied()
}
