//! Everything that speaks to Datadog's logs intake: the log object, batch packing, what each answer means,
//! and the blocking send.

pub mod batch;
pub mod bisect;
pub mod disposition;
pub mod logobj;
pub mod sink;
