//! Per-resource versioned snapshots.
//!
//! A [`Snapshot`] is one generation of the gateway's configuration. Every resource carries a version
//! derived from its content (like go-control-plane's linear cache), so the ADS server can tell exactly
//! which resources changed between two generations and push only those.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::resources::{
    CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL, Resources,
    SCOPED_ROUTE_TYPE_URL, SECRET_TYPE_URL,
};

/// Hex digits kept of a sha256 digest: 64 bits tell versions of one resource apart.
const VERSION_HEX_LEN: usize = 16;

/// One resource of a snapshot, packed for the wire, with its content version.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionedResource {
    pub name: String,
    pub version: String,
    /// The resource packed with its type URL.
    pub resource: Any,
    /// 64 bits of a digest of (name, version): what the type version sums.
    entry_digest: u64,
}

/// One generation of the gateway's configuration, every resource versioned by its content.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    generation: u64,
    /// Only types with at least one resource are present, so an empty type and a missing type compare
    /// equal.
    types: BTreeMap<String, BTreeMap<String, Arc<VersionedResource>>>,
    /// The SotW `version_info` of each present type.
    type_versions: BTreeMap<String, String>,
}

static NO_RESOURCES: BTreeMap<String, Arc<VersionedResource>> = BTreeMap::new();

/// Resources of one type by name, with the prost message they were made from: what lets
/// [`Snapshot::update`] reuse the packed bytes and version of an unchanged resource.
type Reuse<'a, M> = Option<(&'a [Arc<M>], &'a BTreeMap<String, Arc<VersionedResource>>)>;

impl Snapshot {
    /// Packs and versions every resource. The version of a resource is a short hex sha256 of its
    /// prost encoding.
    ///
    /// prost encodes deterministically (fields in tag order) except for map fields, whose order follows
    /// the in-memory HashMap; translation builds resources without map fields, so equal resources get
    /// equal versions.
    pub fn from_resources(generation: u64, resources: &Resources) -> Snapshot {
        Snapshot::build(generation, resources, None)
    }

    /// The snapshot of `resources`, reusing this snapshot's packed bytes and versions for every
    /// resource that is the same `Arc` as in `previous` (the resources this snapshot was made from).
    /// Others are encoded and hashed (an equal copy gets the same version), so a change costs what
    /// changed, as in go-control-plane's linear cache.
    pub fn update(&self, generation: u64, resources: &Resources, previous: &Resources) -> Snapshot {
        Snapshot::build(generation, resources, Some((self, previous)))
    }

    fn build(
        generation: u64,
        resources: &Resources,
        reuse: Option<(&Snapshot, &Resources)>,
    ) -> Snapshot {
        let mut snapshot = Snapshot {
            generation,
            ..Snapshot::default()
        };
        let old = |type_url: &str| reuse.map(|(snap, _)| snap.resources(type_url));
        snapshot.add(
            LISTENER_TYPE_URL,
            &resources.listeners,
            |r| &r.name,
            reuse
                .map(|(_, p)| p.listeners.as_slice())
                .zip(old(LISTENER_TYPE_URL)),
        );
        snapshot.add(
            ROUTE_TYPE_URL,
            &resources.route_configurations,
            |r| &r.name,
            reuse
                .map(|(_, p)| p.route_configurations.as_slice())
                .zip(old(ROUTE_TYPE_URL)),
        );
        snapshot.add(
            SCOPED_ROUTE_TYPE_URL,
            &resources.scoped_route_configurations,
            |r| &r.name,
            reuse
                .map(|(_, p)| p.scoped_route_configurations.as_slice())
                .zip(old(SCOPED_ROUTE_TYPE_URL)),
        );
        snapshot.add(
            CLUSTER_TYPE_URL,
            &resources.clusters,
            |r| &r.name,
            reuse
                .map(|(_, p)| p.clusters.as_slice())
                .zip(old(CLUSTER_TYPE_URL)),
        );
        snapshot.add(
            ENDPOINT_TYPE_URL,
            &resources.cluster_load_assignments,
            |r| &r.cluster_name,
            reuse
                .map(|(_, p)| p.cluster_load_assignments.as_slice())
                .zip(old(ENDPOINT_TYPE_URL)),
        );
        snapshot.add(
            SECRET_TYPE_URL,
            &resources.secrets,
            |r| &r.name,
            reuse
                .map(|(_, p)| p.secrets.as_slice())
                .zip(old(SECRET_TYPE_URL)),
        );
        snapshot
    }

    fn add<M: Message>(
        &mut self,
        type_url: &str,
        messages: &[Arc<M>],
        name_of: impl Fn(&M) -> &String,
        reuse: Reuse<'_, M>,
    ) {
        // By address: translation hands out the same Arc for what it did not re-render. Anything else
        // is encoded and hashed, which gives an unchanged resource its old version anyway.
        let previous: HashSet<*const M> = reuse
            .map(|(msgs, _)| msgs.iter().map(Arc::as_ptr).collect())
            .unwrap_or_default();
        let mut set = BTreeMap::new();
        for message in messages {
            let name = name_of(message);
            let reused = reuse.and_then(|(_, packed)| {
                let same = previous.contains(&Arc::as_ptr(message));
                same.then(|| packed.get(name)).flatten().cloned()
            });
            let resource = reused.unwrap_or_else(|| {
                let bytes = message.encode_to_vec();
                let version = short_digest(&bytes);
                Arc::new(VersionedResource {
                    entry_digest: entry_digest(name, &version),
                    name: name.clone(),
                    version,
                    resource: Any {
                        type_url: type_url.to_string(),
                        value: bytes,
                    },
                })
            });
            if set.insert(name.clone(), resource).is_some() {
                // Translation promises unique names; Envoy would reject a response with duplicates.
                tracing::warn!(
                    type_url,
                    name,
                    "duplicate resource name in snapshot; last one wins"
                );
            }
        }
        if !set.is_empty() {
            self.type_versions
                .insert(type_url.to_string(), type_version_of(&set));
            self.types.insert(type_url.to_string(), set);
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether both snapshots hold the same types, names and versions (the generation is ignored).
    pub fn same_content(&self, other: &Snapshot) -> bool {
        self.types.len() == other.types.len()
            && self
                .types
                .iter()
                .zip(&other.types)
                .all(|((ta, a), (tb, b))| {
                    ta == tb
                        && a.len() == b.len()
                        && a.iter()
                            .zip(b)
                            .all(|((na, ra), (nb, rb))| na == nb && ra.version == rb.version)
                })
    }

    /// The resources of one type by name; an empty map for types this snapshot does not hold.
    pub fn resources(&self, type_url: &str) -> &BTreeMap<String, Arc<VersionedResource>> {
        self.types.get(type_url).unwrap_or(&NO_RESOURCES)
    }

    /// A digest over the (name, version) pairs of one type: the SotW `version_info`.
    pub fn type_version(&self, type_url: &str) -> String {
        match self.type_versions.get(type_url) {
            Some(v) => v.clone(),
            None => type_version_of(&NO_RESOURCES),
        }
    }
}

/// The sum of the entries' digests (names are unique within a type, so this identifies the set of
/// (name, version) pairs). A sum rather than a digest of the whole list: with thousands of resources,
/// each change would otherwise hash them all again.
fn type_version_of(set: &BTreeMap<String, Arc<VersionedResource>>) -> String {
    let sum = set
        .values()
        .fold(set.len() as u64, |acc, r| acc.wrapping_add(r.entry_digest));
    format!("{sum:0width$x}", width = VERSION_HEX_LEN)
}

fn entry_digest(name: &str, version: &str) -> u64 {
    let mut hasher = Sha256::new();
    // The separator keeps ("ab","c") and ("a","bc") apart; names and versions never contain NUL.
    hasher.update(name.as_bytes());
    hasher.update([0]);
    hasher.update(version.as_bytes());
    let digest = hasher.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("sha256 is 32 bytes"))
}

fn short_digest(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(digest)[..VERSION_HEX_LEN].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::google::protobuf::Duration;

    fn cluster(name: &str, timeout_s: i64) -> Cluster {
        Cluster {
            name: name.to_string(),
            connect_timeout: Some(Duration {
                seconds: timeout_s,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    fn resources() -> Resources {
        Resources {
            clusters: vec![cluster("a", 1).into(), cluster("b", 1).into()],
            route_configurations: vec![
                RouteConfiguration {
                    name: "routes".to_string(),
                    ..Default::default()
                }
                .into(),
            ],
            cluster_load_assignments: vec![
                ClusterLoadAssignment {
                    cluster_name: "a".to_string(),
                    ..Default::default()
                }
                .into(),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn versions_follow_content_not_generation() {
        let one = Snapshot::from_resources(1, &resources());
        let two = Snapshot::from_resources(2, &resources());
        assert_eq!(one.generation(), 1);
        assert_eq!(two.generation(), 2);
        assert!(one.same_content(&two));
        assert_eq!(
            one.resources(CLUSTER_TYPE_URL),
            two.resources(CLUSTER_TYPE_URL)
        );
        assert_eq!(
            one.type_version(CLUSTER_TYPE_URL),
            two.type_version(CLUSTER_TYPE_URL)
        );
        let a = &one.resources(CLUSTER_TYPE_URL)["a"];
        assert_eq!(a.version.len(), VERSION_HEX_LEN);
        assert_eq!(a.resource.type_url, CLUSTER_TYPE_URL);
        assert_eq!(
            Cluster::decode(a.resource.value.as_slice()).unwrap(),
            cluster("a", 1)
        );
    }

    #[test]
    fn changing_one_resource_changes_only_its_version_and_its_type_version() {
        let before = Snapshot::from_resources(1, &resources());
        let mut changed = resources();
        changed.clusters[1] = cluster("b", 2).into();
        let after = Snapshot::from_resources(2, &changed);
        assert!(!before.same_content(&after));
        let (b, a) = (
            before.resources(CLUSTER_TYPE_URL),
            after.resources(CLUSTER_TYPE_URL),
        );
        assert_eq!(b["a"].version, a["a"].version);
        assert_ne!(b["b"].version, a["b"].version);
        assert_ne!(
            before.type_version(CLUSTER_TYPE_URL),
            after.type_version(CLUSTER_TYPE_URL)
        );
        assert_eq!(
            before.type_version(ROUTE_TYPE_URL),
            after.type_version(ROUTE_TYPE_URL)
        );
        assert_eq!(
            before.type_version(ENDPOINT_TYPE_URL),
            after.type_version(ENDPOINT_TYPE_URL)
        );
    }

    #[test]
    fn update_reuses_unchanged_resources_and_matches_a_fresh_build() {
        let before = resources();
        let first = Snapshot::from_resources(1, &before);
        // As translation does: what did not change is the same Arc.
        let mut changed = before.clone();
        changed.clusters[1] = cluster("b", 2).into();
        changed.clusters.push(cluster("c", 1).into());
        changed.route_configurations.clear();
        let updated = first.update(2, &changed, &before);
        let fresh = Snapshot::from_resources(2, &changed);
        assert!(updated.same_content(&fresh));
        for t in [CLUSTER_TYPE_URL, ROUTE_TYPE_URL, ENDPOINT_TYPE_URL] {
            assert_eq!(updated.resources(t), fresh.resources(t), "{t}");
            assert_eq!(updated.type_version(t), fresh.type_version(t), "{t}");
        }
        // The unchanged cluster is the very same packed resource, not a copy.
        assert!(Arc::ptr_eq(
            &first.resources(CLUSTER_TYPE_URL)["a"],
            &updated.resources(CLUSTER_TYPE_URL)["a"]
        ));
    }

    #[test]
    fn same_content_sees_added_and_removed_resources() {
        let base = Snapshot::from_resources(1, &resources());
        let mut fewer = resources();
        fewer.clusters.pop();
        assert!(!base.same_content(&Snapshot::from_resources(2, &fewer)));
        let mut no_routes = resources();
        no_routes.route_configurations.clear();
        assert!(!base.same_content(&Snapshot::from_resources(2, &no_routes)));
        assert!(
            Snapshot::default().same_content(&Snapshot::from_resources(7, &Resources::default()))
        );
    }

    #[test]
    fn unknown_and_empty_types_are_empty_with_a_stable_version() {
        let snap = Snapshot::from_resources(1, &resources());
        assert!(snap.resources(LISTENER_TYPE_URL).is_empty());
        assert!(
            snap.resources("type.googleapis.com/unknown.Type")
                .is_empty()
        );
        assert_eq!(
            snap.type_version(LISTENER_TYPE_URL),
            Snapshot::default().type_version("x")
        );
        assert!(!snap.type_version(LISTENER_TYPE_URL).is_empty());
        assert_ne!(
            snap.type_version(LISTENER_TYPE_URL),
            snap.type_version(CLUSTER_TYPE_URL)
        );
    }

    #[test]
    fn renaming_a_resource_changes_its_type_version() {
        let mut renamed = resources();
        Arc::make_mut(&mut renamed.route_configurations[0]).name = "other".to_string();
        let a = Snapshot::from_resources(1, &resources());
        let b = Snapshot::from_resources(1, &renamed);
        assert_ne!(
            a.type_version(ROUTE_TYPE_URL),
            b.type_version(ROUTE_TYPE_URL)
        );
    }
}
