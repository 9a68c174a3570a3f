//! Broker ingress, trigger dispatch and delivery, replies and PingSource
