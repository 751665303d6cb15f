//! Tests of the ring: decode and encode on hand-built buffers, and a real mount served over io-uring.
