//! Interior mutability that cannot fail: [`Exclusive::with`] takes the value
//! out of its `Cell`, runs `f` on it and puts it back. A `RefCell` borrow can
//! conflict, and handling the conflict silently loses work (a call, a
//! waiter); here there is nothing to conflict.

use std::cell::Cell;
use std::fmt;

#[derive(Default)]
pub struct Exclusive<T: Default>(Cell<T>);

impl<T: Default> Exclusive<T> {
    /// Runs `f` on the value. `f` must not reach this same value (it would
    /// see an empty default), so callers keep `f` to work on plain data.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut value = self.0.take();
        let result = f(&mut value);
        self.0.set(value);
        result
    }
}

impl<T: Default> fmt::Debug for Exclusive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Exclusive(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_changes_the_value_in_place() {
        let list: Exclusive<Vec<u32>> = Exclusive::default();
        list.with(|l| l.push(1));
        assert_eq!(list.with(|l| { l.push(2); l.clone() }), [1, 2]);
    }
}
