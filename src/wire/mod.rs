//! Pure codecs for what crosses the network besides raw client bytes: the enrollment and
//! renewal bodies, the QUIC stream header, and PROXY protocol headers. No sockets, no async: functions over bytes
//! and serde types, unit-tested on their own.

pub(crate) mod enroll;
pub(crate) mod proxy_header;
pub(crate) mod stream;
