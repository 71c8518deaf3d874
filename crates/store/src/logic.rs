//! Decision logic shared by every backend, free of I/O.

use std::collections::BTreeSet;

use crate::{DeviceId, StoreError};

/// Compares the devices a post addresses with the devices it must address.
/// Returns `Ok(())` when they are the same set, [`StoreError::DeviceMismatch`] with sorted
/// `missing` and `extra` ids otherwise, and [`StoreError::Invalid`] if a device is addressed twice.
pub fn check_device_set(expected: &[DeviceId], addressed: &[DeviceId]) -> Result<(), StoreError> {
    let want: BTreeSet<DeviceId> = expected.iter().copied().collect();
    let mut got = BTreeSet::new();
    for d in addressed {
        if !got.insert(*d) {
            return Err(StoreError::Invalid(format!("device {d} addressed twice")));
        }
    }
    if want == got {
        return Ok(());
    }
    Err(StoreError::DeviceMismatch {
        missing: want.difference(&got).copied().collect(),
        extra: got.difference(&want).copied().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Case<'a> = (&'a [u64], &'a [u64], Result<(), StoreError>);

    #[test]
    fn table() {
        let cases: &[Case<'_>] = &[
            (&[1, 2], &[2, 1], Ok(())),
            (&[], &[], Ok(())),
            (
                &[1, 2],
                &[1, 3],
                Err(StoreError::DeviceMismatch {
                    missing: vec![2],
                    extra: vec![3],
                }),
            ),
            (
                &[1],
                &[],
                Err(StoreError::DeviceMismatch {
                    missing: vec![1],
                    extra: vec![],
                }),
            ),
            (
                &[1],
                &[1, 1],
                Err(StoreError::Invalid("device 1 addressed twice".into())),
            ),
        ];
        for (expected, addressed, want) in cases {
            assert_eq!(
                &check_device_set(expected, addressed),
                want,
                "{expected:?} vs {addressed:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn mismatch_lists_exactly_the_difference(
            expected in proptest::collection::btree_set(0u64..20, 0..8),
            addressed in proptest::collection::btree_set(0u64..20, 0..8),
        ) {
            let e: Vec<_> = expected.iter().copied().collect();
            let a: Vec<_> = addressed.iter().copied().collect();
            match check_device_set(&e, &a) {
                Ok(()) => prop_assert_eq!(&expected, &addressed),
                Err(StoreError::DeviceMismatch { missing, extra }) => {
                    for m in &missing { prop_assert!(expected.contains(m) && !addressed.contains(m)); }
                    for x in &extra { prop_assert!(addressed.contains(x) && !expected.contains(x)); }
                    prop_assert_eq!(missing.len() + addressed.len(), expected.len() + extra.len());
                }
                Err(other) => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}
