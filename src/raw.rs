//! A payload kept as its CBOR encoding, to forward without knowing its type.

use std::any::{Any, TypeId};
use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::error::Error;

/// A payload as it travels: its CBOR encoding, valid by construction. A
/// handler that takes `Message<RawPayload>` receives the bytes exactly as
/// sent, and can forward them (by value) to another peer, or decode them
/// later, without knowing the type.
///
/// ```
/// use clusterphone::RawPayload;
/// let raw = RawPayload::encode(&("job", 7u32))?;
/// let (name, n): (String, u32) = raw.decode()?;
/// assert_eq!((name.as_str(), n), ("job", 7));
/// # Ok::<(), clusterphone::Error>(())
/// ```
///
/// Received as part of a larger type (a field of a struct), it is
/// re-encoded from the decoded value: the same value, not always the same bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RawPayload(pub(crate) Vec<u8>);

impl RawPayload {
    /// The CBOR encoding of `value`.
    ///
    /// # Errors
    /// [`Error::Encode`] if `value` cannot be encoded.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<RawPayload, Error> {
        let mut bytes = Vec::new();
        ciborium::into_writer(value, &mut bytes).map_err(|e| Error::Encode(e.to_string()))?;
        Ok(RawPayload(bytes))
    }

    /// Decodes the payload into `T`.
    ///
    /// # Errors
    /// [`Error::Decode`] if it does not decode into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        codec::decode_cbor(&self.0).map_err(Error::Decode)
    }

    /// The CBOR bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// `bytes` as a `T`, if `T` is `RawPayload` and `bytes` are exactly one
    /// well-formed CBOR item: the exact received bytes, where serde could
    /// only hand over a decoded value. (Anything else falls back to serde,
    /// which refuses it as a bad payload.)
    pub(crate) fn received_as<T: 'static>(bytes: &[u8]) -> Option<T> {
        if TypeId::of::<T>() != TypeId::of::<RawPayload>() {
            return None;
        }
        let mut rest = bytes;
        if ciborium::from_reader::<serde::de::IgnoredAny, _>(&mut rest).is_err() || !rest.is_empty() {
            return None;
        }
        let mut slot = Some(RawPayload(bytes.to_vec()));
        (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>()?.take()
    }
}

impl fmt::Debug for RawPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawPayload({} bytes)", self.0.len())
    }
}

impl<'de> serde::Deserialize<'de> for RawPayload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawPayload, D::Error> {
        let value = ciborium::Value::deserialize(d)?;
        RawPayload::encode(&value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_bytes_stay_exact_and_nested_ones_decode_the_same() {
        // An indefinite-length array: the same value re-encodes differently.
        let wire = [0x9f, 0x01, 0x02, 0xff];
        let raw = RawPayload::received_as::<RawPayload>(&wire).unwrap();
        assert_eq!(raw.as_bytes(), &wire);
        assert_eq!(raw.decode::<Vec<u8>>().unwrap(), vec![1, 2]);
        assert!(RawPayload::received_as::<Vec<u8>>(&wire).is_none());
        // Not CBOR, nothing at all, or one item and more: never taken as it is.
        for bad in [&[0xff, 0x1c, 0x00][..], &[], &[0x01, 0x02]] {
            assert!(RawPayload::received_as::<RawPayload>(bad).is_none(), "{bad:?}");
        }
        // Inside another type: decoded and re-encoded, the same value.
        let outer = RawPayload::encode(&("x", vec![1u8, 2])).unwrap();
        let (name, inner): (String, RawPayload) = outer.decode().unwrap();
        assert_eq!(name, "x");
        assert_eq!(inner.decode::<Vec<u8>>().unwrap(), vec![1, 2]);
    }
}
