//! Labels: how containers, networks and volumes say whose they are.
//!
//! Owns every label key and value meshbox writes or filters on, and the
//! label sets of each kind of object. Nothing outside this module spells a
//! label as a string literal.

use std::collections::HashMap;

use crate::orchestrator::{Role, ServiceKey};

/// Set to [`TRUE`] on everything meshbox creates.
pub const MANAGED: &str = "meshbox.managed";
pub const MESH: &str = "meshbox.mesh";
pub const SERVICE: &str = "meshbox.service";
/// What the object is for: [`Role::as_str`] for sandboxes, or one of the
/// `ROLE_*` values below.
pub const ROLE: &str = "meshbox.role";
/// The meshbox instance (data dir) that owns it: adopt, sweep and release
/// touch only their own instance's objects.
pub const INSTANCE: &str = "meshbox.instance";
/// What a server container was created from (see `spec_hash`).
pub const SPEC_HASH: &str = "meshbox.spec-hash";

/// The value of [`MANAGED`].
pub const TRUE: &str = "true";
/// [`ROLE`] of egress proxies.
pub const ROLE_PROXY: &str = "proxy";
/// [`ROLE`] of a mesh's bridge network.
pub const ROLE_MESH_NETWORK: &str = "mesh-network";
/// [`ROLE`] of a mesh's internal egress network.
pub const ROLE_EGRESS_NETWORK: &str = "egress-network";

pub type Labels = HashMap<String, String>;

/// The labels of everything an instance creates for a mesh, with its role.
pub fn of_mesh(instance: &str, mesh: &str, role: &str) -> Labels {
    Labels::from([
        (MANAGED.to_owned(), TRUE.to_owned()),
        (INSTANCE.to_owned(), instance.to_owned()),
        (MESH.to_owned(), mesh.to_owned()),
        (ROLE.to_owned(), role.to_owned()),
    ])
}

/// The labels of a sandbox: whose it is, what for, which instance.
pub fn of_sandbox(instance: &str, owner: &ServiceKey, role: Role) -> Labels {
    let mut labels = of_mesh(instance, &owner.mesh, role.as_str());
    labels.insert(SERVICE.to_owned(), owner.name.clone());
    labels
}

/// The labels of a volume an instance creates (an install cache).
pub fn of_volume(instance: &str) -> Labels {
    Labels::from([
        (MANAGED.to_owned(), TRUE.to_owned()),
        (INSTANCE.to_owned(), instance.to_owned()),
    ])
}

/// A `label` filter matching objects that carry all of `pairs`.
pub fn filter(pairs: &[(&str, &str)]) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_owned(),
        pairs.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    )])
}

/// The value of `key` in a label map, if any.
pub fn get<'a>(labels: Option<&'a Labels>, key: &str) -> Option<&'a str> {
    labels.and_then(|l| l.get(key)).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_labels_name_owner_role_and_instance() {
        let owner = ServiceKey {
            mesh: "acme".into(),
            name: "time".into(),
        };
        let l = of_sandbox("ab12", &owner, Role::Install);
        assert_eq!(l[MANAGED], TRUE);
        assert_eq!(l[INSTANCE], "ab12");
        assert_eq!(l[MESH], "acme");
        assert_eq!(l[SERVICE], "time");
        assert_eq!(l[ROLE], "install");
        assert_eq!(l.len(), 5);
        assert_eq!(get(Some(&l), ROLE), Some("install"));
        assert_eq!(get(None, ROLE), None);
    }

    #[test]
    fn filters_are_key_equals_value() {
        let f = filter(&[(MESH, "acme"), (ROLE, ROLE_PROXY)]);
        assert_eq!(
            f["label"],
            vec![
                "meshbox.mesh=acme".to_owned(),
                "meshbox.role=proxy".to_owned()
            ]
        );
    }
}
