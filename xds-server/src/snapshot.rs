//! Per-resource versioned snapshots.
//!
//! A [`Snapshot`] is one generation of the gateway's configuration. Every resource carries a version
//! derived from its content (like go-control-plane's linear cache), so the ADS server can tell exactly
//! which resources changed between two generations and push only those.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
///
/// A snapshot made by [`Snapshot::update`] also knows which names changed since the snapshot it was
/// made from (its parent), so a stream that has sent the parent diffs only those.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Unique per built snapshot (0 only for the empty default); what `parent` refers to.
    id: u64,
    parent: Option<u64>,
    generation: u64,
    /// Only types with at least one resource are present, so an empty type and a missing type compare
    /// equal.
    types: BTreeMap<String, TypeResources>,
    /// Per type, the names added, changed or removed since `parent` (a type without changes is
    /// absent). A name whose resource was rebuilt may keep its version: readers compare versions.
    changes: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone)]
struct TypeResources {
    by_name: BTreeMap<String, Arc<VersionedResource>>,
    /// One per message, in the order of the messages the snapshot was built from: what lets
    /// [`Snapshot::update`] find an unchanged message's packed resource without a name lookup.
    in_order: Vec<Arc<VersionedResource>>,
    /// The SotW `version_info`.
    version: String,
    /// The sum of the entries' digests, which `version` is made of.
    sum: u64,
}

static NO_RESOURCES: BTreeMap<String, Arc<VersionedResource>> = BTreeMap::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The messages of one type the previous snapshot was built from, and that snapshot.
type Reuse<'a, M> = Option<(&'a [Arc<M>], &'a Snapshot)>;

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
    /// changed, as in go-control-plane's linear cache. The result records what changed since this one.
    pub fn update(&self, generation: u64, resources: &Resources, previous: &Resources) -> Snapshot {
        Snapshot::build(generation, resources, Some((self, previous)))
    }

    fn build(
        generation: u64,
        resources: &Resources,
        reuse: Option<(&Snapshot, &Resources)>,
    ) -> Snapshot {
        let mut snapshot = Snapshot {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            parent: reuse.map(|(parent, _)| parent.id),
            generation,
            ..Snapshot::default()
        };
        let parent = reuse.map(|(snap, _)| snap);
        snapshot.add(
            LISTENER_TYPE_URL,
            &resources.listeners,
            |r| &r.name,
            reuse.map(|(_, p)| p.listeners.as_slice()).zip(parent),
        );
        snapshot.add(
            ROUTE_TYPE_URL,
            &resources.route_configurations,
            |r| &r.name,
            reuse
                .map(|(_, p)| p.route_configurations.as_slice())
                .zip(parent),
        );
        snapshot.add(
            SCOPED_ROUTE_TYPE_URL,
            &resources.scoped_route_configurations,
            |r| &r.name,
            reuse
                .map(|(_, p)| p.scoped_route_configurations.as_slice())
                .zip(parent),
        );
        snapshot.add(
            CLUSTER_TYPE_URL,
            &resources.clusters,
            |r| &r.name,
            reuse.map(|(_, p)| p.clusters.as_slice()).zip(parent),
        );
        snapshot.add(
            ENDPOINT_TYPE_URL,
            &resources.cluster_load_assignments,
            |r| &r.cluster_name,
            reuse
                .map(|(_, p)| p.cluster_load_assignments.as_slice())
                .zip(parent),
        );
        snapshot.add(
            SECRET_TYPE_URL,
            &resources.secrets,
            |r| &r.name,
            reuse.map(|(_, p)| p.secrets.as_slice()).zip(parent),
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
        let old = reuse.and_then(|(_, parent)| parent.types.get(type_url));
        // By address: translation hands out the same Arc for what it did not re-render. Anything else
        // is encoded and hashed, which gives an unchanged resource its old version anyway.
        let mut finder = match (reuse, old) {
            (Some((previous, _)), Some(old)) if previous.len() == old.in_order.len() => {
                Some(PreviousFinder::new(previous, &old.in_order))
            }
            _ => None,
        };
        let mut in_order = Vec::with_capacity(messages.len());
        let mut rebuilt = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            let reused = finder.as_mut().and_then(|f| f.find(i, message));
            let resource = reused.unwrap_or_else(|| {
                let name = name_of(message);
                let bytes = message.encode_to_vec();
                let version = short_digest(&bytes);
                let resource = Arc::new(VersionedResource {
                    entry_digest: entry_digest(name, &version),
                    name: name.clone(),
                    version,
                    resource: Any {
                        type_url: type_url.to_string(),
                        value: bytes,
                    },
                });
                rebuilt.push(resource.clone());
                resource
            });
            in_order.push(resource);
        }
        // With a parent, patch its map: a copy plus what changed costs no name comparisons for the
        // thousands of resources that stayed.
        let patched = match (old, finder) {
            (Some(old), Some(finder)) => {
                let mut by_name = old.by_name.clone();
                let mut sum = old.sum;
                let mut changed = Vec::with_capacity(rebuilt.len());
                for (j, used) in finder.used.iter().enumerate() {
                    if !used {
                        let gone = &old.in_order[j];
                        if by_name.remove(&gone.name).is_some() {
                            sum = sum.wrapping_sub(gone.entry_digest);
                        }
                        changed.push(gone.name.clone());
                    }
                }
                for r in &rebuilt {
                    if let Some(replaced) = by_name.insert(r.name.clone(), r.clone()) {
                        sum = sum.wrapping_sub(replaced.entry_digest);
                    }
                    sum = sum.wrapping_add(r.entry_digest);
                    changed.push(r.name.clone());
                }
                // A duplicate name (which translation never makes) defeats the bookkeeping.
                (by_name.len() == in_order.len()).then_some((by_name, sum, changed))
            }
            _ => None,
        };
        let (by_name, sum, changed) = patched.unwrap_or_else(|| {
            // Translation emits names mostly in order, so the sort has little to do; on a duplicate
            // name the last one wins.
            let by_name: BTreeMap<String, Arc<VersionedResource>> = in_order
                .iter()
                .map(|r| (r.name.clone(), r.clone()))
                .collect();
            if by_name.len() < in_order.len() {
                // Translation promises unique names; Envoy would reject a response with duplicates.
                tracing::warn!(
                    type_url,
                    "duplicate resource names in snapshot; last one wins"
                );
            }
            let sum = by_name
                .values()
                .fold(0u64, |acc, r| acc.wrapping_add(r.entry_digest));
            let changed = match old {
                Some(old) => {
                    let mut changed: Vec<String> = rebuilt.iter().map(|r| r.name.clone()).collect();
                    changed.extend(removed_names(&old.by_name, &by_name));
                    changed
                }
                None => by_name.keys().cloned().collect(),
            };
            (by_name, sum, changed)
        });
        if reuse.is_some() && !changed.is_empty() {
            let mut changed = changed;
            changed.sort_unstable();
            changed.dedup();
            self.changes.insert(type_url.to_string(), changed);
        }
        if !by_name.is_empty() {
            self.types.insert(
                type_url.to_string(),
                TypeResources {
                    version: type_version(by_name.len(), sum),
                    by_name,
                    in_order,
                    sum,
                },
            );
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Identifies this snapshot among all built in this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// When this snapshot was made from the snapshot `id`: the names of `type_url` that may differ
    /// from it (added, changed or removed). None when it was not made from that snapshot.
    pub fn changes_since(&self, id: u64, type_url: &str) -> Option<&[String]> {
        if self.parent != Some(id) {
            return None;
        }
        Some(self.changes.get(type_url).map_or(&[], Vec::as_slice))
    }

    /// Whether both snapshots hold the same types, names and versions (the generation is ignored).
    pub fn same_content(&self, other: &Snapshot) -> bool {
        // Parent and child: only the recorded changes can differ.
        let (child, parent) = if self.parent == Some(other.id) {
            (self, other)
        } else if other.parent == Some(self.id) {
            (other, self)
        } else {
            return self.types.len() == other.types.len()
                && self
                    .types
                    .iter()
                    .zip(&other.types)
                    .all(|((ta, a), (tb, b))| {
                        ta == tb
                            && a.by_name.len() == b.by_name.len()
                            && a.by_name
                                .iter()
                                .zip(&b.by_name)
                                .all(|((na, ra), (nb, rb))| na == nb && ra.version == rb.version)
                    });
        };
        child.changes.iter().all(|(type_url, names)| {
            let (c, p) = (child.resources(type_url), parent.resources(type_url));
            names
                .iter()
                .all(|n| c.get(n).map(|r| &r.version) == p.get(n).map(|r| &r.version))
        })
    }

    /// The resources of one type by name; an empty map for types this snapshot does not hold.
    pub fn resources(&self, type_url: &str) -> &BTreeMap<String, Arc<VersionedResource>> {
        self.types
            .get(type_url)
            .map_or(&NO_RESOURCES, |t| &t.by_name)
    }

    /// The types this snapshot holds resources of.
    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    /// A digest over the (name, version) pairs of one type: the SotW `version_info`.
    pub fn type_version(&self, type_url: &str) -> String {
        match self.types.get(type_url) {
            Some(t) => t.version.clone(),
            None => type_version(0, 0),
        }
    }
}

/// Finds the packed resource of a message that was in the previous snapshot, by address. Messages
/// mostly keep their place (shifted by what was added or removed before them), so the guess is the
/// index of the last hit plus the same offset; a miss falls back to an index of addresses.
struct PreviousFinder<'a, M> {
    previous: &'a [Arc<M>],
    packed: &'a [Arc<VersionedResource>],
    offset: isize,
    by_address: Option<HashMap<*const M, usize>>,
    /// Which previous resources were found again.
    used: Vec<bool>,
}

impl<'a, M> PreviousFinder<'a, M> {
    fn new(previous: &'a [Arc<M>], packed: &'a [Arc<VersionedResource>]) -> Self {
        PreviousFinder {
            previous,
            packed,
            offset: 0,
            by_address: None,
            used: vec![false; packed.len()],
        }
    }

    fn find(&mut self, i: usize, message: &Arc<M>) -> Option<Arc<VersionedResource>> {
        let ptr = Arc::as_ptr(message);
        let guess = i.checked_add_signed(self.offset);
        let at =
            match guess.filter(|&g| self.previous.get(g).is_some_and(|p| Arc::as_ptr(p) == ptr)) {
                Some(g) => g,
                None => {
                    let previous = self.previous;
                    let index = self.by_address.get_or_insert_with(|| {
                        previous
                            .iter()
                            .enumerate()
                            .map(|(j, m)| (Arc::as_ptr(m), j))
                            .collect()
                    });
                    let j = *index.get(&ptr)?;
                    self.offset = j as isize - i as isize;
                    j
                }
            };
        self.used[at] = true;
        Some(self.packed[at].clone())
    }
}

/// Names of `old` that are not in `new`, by one walk over both (sorted) maps.
fn removed_names(
    old: &BTreeMap<String, Arc<VersionedResource>>,
    new: &BTreeMap<String, Arc<VersionedResource>>,
) -> Vec<String> {
    let mut removed = Vec::new();
    let mut new_names = new.keys().peekable();
    for name in old.keys() {
        while new_names.next_if(|n| *n < name).is_some() {}
        if new_names.peek() != Some(&name) {
            removed.push(name.clone());
        }
    }
    removed
}

/// The SotW version of a type: the number of entries and the sum of their digests (names are unique
/// within a type, so this identifies the set of (name, version) pairs). A sum rather than a digest of
/// the whole list: it can be patched, where a digest would hash thousands of entries on each change.
fn type_version(len: usize, sum: u64) -> String {
    format!(
        "{:0width$x}",
        (len as u64).wrapping_add(sum),
        width = VERSION_HEX_LEN
    )
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

/// The version a snapshot gives `message`: what a rejection names.
pub fn content_version(message: &impl Message) -> String {
    short_digest(&message.encode_to_vec())
}

fn short_digest(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(digest)[..VERSION_HEX_LEN].to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::google::protobuf::Duration;
    use std::collections::BTreeSet;

    pub(crate) fn cluster(name: &str, timeout_s: i64) -> Cluster {
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

    /// A tiny xorshift generator: deterministic "random" edits without a dependency.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// One random edit of the clusters, as translation makes them: untouched ones keep their Arc.
    pub(crate) fn edit(rng: &mut Rng, clusters: &mut Vec<Arc<Cluster>>, next: &mut u64) {
        match rng.below(4) {
            0 if !clusters.is_empty() => {
                let i = rng.below(clusters.len() as u64) as usize;
                clusters.remove(i);
            }
            1 if !clusters.is_empty() => {
                let i = rng.below(clusters.len() as u64) as usize;
                let name = clusters[i].name.clone();
                clusters[i] = cluster(&name, rng.below(3) as i64).into();
            }
            2 if !clusters.is_empty() => {
                // Rebuilt with the same content: a new Arc, the same version.
                let i = rng.below(clusters.len() as u64) as usize;
                clusters[i] = Arc::new((*clusters[i]).clone());
            }
            _ => {
                *next += 1;
                clusters.push(cluster(&format!("c{:03}", rng.below(200)), 1).into());
                clusters.sort_by(|a, b| a.name.cmp(&b.name));
                clusters.dedup_by(|a, b| a.name == b.name);
            }
        }
    }

    #[test]
    fn recorded_changes_cover_every_difference_from_the_parent() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let mut next = 0;
        let mut clusters: Vec<Arc<Cluster>> = Vec::new();
        for _ in 0..20 {
            edit(&mut rng, &mut clusters, &mut next);
        }
        let mut resources = Resources {
            clusters: clusters.clone(),
            ..Default::default()
        };
        let mut snap = Snapshot::from_resources(1, &resources);
        assert_eq!(snap.changes_since(0, CLUSTER_TYPE_URL), None);
        for generation in 2..300 {
            let mut clusters = resources.clusters.clone();
            for _ in 0..=rng.below(3) {
                edit(&mut rng, &mut clusters, &mut next);
            }
            let changed = Resources {
                clusters,
                ..Default::default()
            };
            let updated = snap.update(generation, &changed, &resources);
            let fresh = Snapshot::from_resources(generation, &changed);
            assert!(updated.same_content(&fresh));
            assert_eq!(
                updated.type_version(CLUSTER_TYPE_URL),
                fresh.type_version(CLUSTER_TYPE_URL)
            );
            let (before, after) = (
                snap.resources(CLUSTER_TYPE_URL),
                updated.resources(CLUSTER_TYPE_URL),
            );
            let listed = updated.changes_since(snap.id(), CLUSTER_TYPE_URL).unwrap();
            let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
            for name in names {
                let differs =
                    before.get(name).map(|r| &r.version) != after.get(name).map(|r| &r.version);
                if differs {
                    assert!(
                        listed.contains(name),
                        "generation {generation}: {name} changed but is not listed"
                    );
                }
            }
            // The fast comparison of parent and child agrees with the full one.
            let unrelated = Snapshot::from_resources(0, &resources);
            assert_eq!(
                updated.same_content(&snap),
                updated.same_content(&unrelated)
            );
            assert_eq!(
                snap.same_content(&updated),
                unrelated.same_content(&updated)
            );
            assert_eq!(updated.changes_since(updated.id(), CLUSTER_TYPE_URL), None);
            snap = updated;
            resources = changed;
        }
    }

    #[test]
    fn an_emptied_type_lists_every_name_it_held() {
        let first = Snapshot::from_resources(1, &resources());
        let mut changed = resources();
        changed.clusters.clear();
        let second = first.update(2, &changed, &resources());
        let listed = second.changes_since(first.id(), CLUSTER_TYPE_URL).unwrap();
        assert_eq!(listed, ["a".to_string(), "b".to_string()]);
        assert!(second.resources(CLUSTER_TYPE_URL).is_empty());
        assert!(!second.same_content(&first));
    }
}
