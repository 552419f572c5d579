//! Loopback simulators of Mimecast API 2.0 and Datadog's logs intake, speaking real HTTP on 127.0.0.1.
//! They serve `demo` and the tests, and behave like the documented APIs, quirks included.

pub mod datadog;
pub mod http;
pub mod mimecast;
pub mod records;
