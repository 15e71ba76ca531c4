//! The shell's vocabulary, as data: each command word with its usage and keywords. `help`,
//! `?` and Tab completion all read this one table (pure: no I/O).

use fulcrum_schema::Registry;

pub struct Verb {
    pub word: &'static str,
    pub summary: &'static str,
    /// One line per form of the command.
    pub usage: &'static [&'static str],
}

const UPGRADE_SCOPES: &[&str] = &["system", "controller", "segroup"];
/// Keywords of the upgrade operations that take a value.
pub const VALUE_KEYWORDS: &[&str] =
    &["image_ref", "controller_patch_ref", "se_patch_ref", "se_group_refs", "action_on_error"];
const FLAG_KEYWORDS: &[&str] = &["disruptive", "skip_warnings"];
pub const ACTIONS_ON_ERROR: &[&str] =
    &["SUSPEND_UPGRADE_OPS_ON_ERROR", "CONTINUE_UPGRADE_OPS_ON_ERROR", "ROLLBACK_UPGRADE_OPS_ON_ERROR"];

pub const VERBS: &[Verb] = &[
    Verb {
        word: "show",
        summary: "show objects, their fields, upgrade and async PATCH status",
        usage: &[
            "show <type>                          list objects of a type (show pool, show virtualservice, ...)",
            "show <type> <name>                   one object, field by field",
            "show systemconfiguration | controllerproperties",
            "show cluster                         the cluster's state; each controller's role and state",
            "show serviceengine                   SEs with group, version, states, last heartbeat",
            "show serviceenginegroup <name>       a group, then its SEs",
            "show pool <name> server              each server's health and traffic, as the SEs see them",
            "show pool-async status <patch_id>    the status of an asynchronous PATCH",
            "show upgrade status [detail]         where the controller and each SE group stand",
        ],
    },
    Verb {
        word: "upload",
        summary: "upload a software package (resumable, with progress)",
        usage: &["upload image filename <path>         Ctrl-C stops it; the same command again resumes it"],
    },
    Verb {
        word: "delete",
        summary: "delete an object",
        usage: &["delete <type> <name>                 (delete image <name> also abandons an interrupted upload)"],
    },
    Verb {
        word: "upgrade",
        summary: "upgrade the system, the controller or SE groups (checks first)",
        usage: &[
            "upgrade system image_ref <image> [skip_warnings]",
            "upgrade controller image_ref <image> [skip_warnings]",
            "upgrade segroup image_ref <image> se_group_refs <group>... [action_on_error <ACTION>] [disruptive] [skip_warnings]",
        ],
    },
    Verb {
        word: "patch",
        summary: "apply a patch to the controller or SE groups (checks first)",
        usage: &[
            "patch system controller_patch_ref <image> se_patch_ref <image> [skip_warnings]",
            "patch controller controller_patch_ref <image> [skip_warnings]",
            "patch segroup se_patch_ref <image> se_group_refs <group>... [skip_warnings]",
        ],
    },
    Verb {
        word: "rollback",
        summary: "go back to the previous version",
        usage: &["rollback system|controller|segroup [se_group_refs <group>...] [skip_warnings]"],
    },
    Verb {
        word: "rollbackpatch",
        summary: "remove the last patch",
        usage: &["rollbackpatch system|controller|segroup [se_group_refs <group>...] [skip_warnings]"],
    },
    Verb {
        word: "resume",
        summary: "resume a suspended SE-group upgrade",
        usage: &["resume segroup se_group_refs <group>... [skip_warnings]"],
    },
    Verb { word: "clear", summary: "clear the screen", usage: &["clear"] },
    Verb {
        word: "help",
        summary: "this list; help <command> for its keywords (or <command> ?)",
        usage: &["help [<command>]"],
    },
    Verb { word: "exit", summary: "leave the shell (also quit, Ctrl-D)", usage: &["exit"] },
    Verb { word: "quit", summary: "leave the shell", usage: &["quit"] },
];

/// `help` and `?`: every command; `help <command>` and `<command> ?`: its forms and keywords.
pub fn help(topic: Option<&str>) -> Result<String, String> {
    let Some(word) = topic else {
        let mut out = String::from("Commands (help <command> or <command> ? for its keywords; Tab completes):\n");
        for v in VERBS {
            out.push_str(&format!("  {:<15} {}\n", v.word, v.summary));
        }
        return Ok(out);
    };
    let verb = VERBS.iter().find(|v| v.word == word).ok_or_else(|| format!("unknown command '{word}'; type help"))?;
    let mut out = format!("{}: {}\n", verb.word, verb.summary);
    for line in verb.usage {
        out.push_str(&format!("  {line}\n"));
    }
    if is_operation(word) {
        out.push_str(&format!(
            "keywords: {}\nactions on error: {}\n",
            VALUE_KEYWORDS.iter().chain(FLAG_KEYWORDS).copied().collect::<Vec<_>>().join(" "),
            ACTIONS_ON_ERROR.join(" ")
        ));
    }
    Ok(out)
}

fn is_operation(word: &str) -> bool {
    matches!(word, "upgrade" | "patch" | "rollback" | "rollbackpatch" | "resume")
}

/// What may come next on a line whose finished words are `words`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// One of these words.
    Words(Vec<&'static str>),
    /// The name of an object of this type, or one of these words.
    Names(&'static str, Vec<&'static str>),
    /// A file's path.
    File,
    Nothing,
}

fn type_names(with_singletons: bool) -> Vec<&'static str> {
    Registry::get().types().iter().filter(|t| with_singletons || !t.singleton).map(|t| t.path).collect()
}

fn known_type(word: &str) -> Option<&'static str> {
    Registry::get().type_def(word).filter(|t| !t.singleton).map(|t| t.path)
}

pub fn next(words: &[&str]) -> Next {
    match words {
        [] => Next::Words(VERBS.iter().map(|v| v.word).collect()),
        ["help"] => Next::Words(VERBS.iter().map(|v| v.word).collect()),
        ["show"] => {
            let mut all = type_names(true);
            all.extend(["pool-async", "upgrade"]);
            Next::Words(all)
        }
        ["show", "upgrade"] | ["show", "pool-async"] => Next::Words(vec!["status"]),
        ["show", "upgrade", "status"] => Next::Words(vec!["detail"]),
        ["show", kind] | ["delete", kind] => known_type(kind).map_or(Next::Nothing, |t| Next::Names(t, vec![])),
        ["show", "pool", _name] => Next::Words(vec!["server"]),
        ["delete"] => Next::Words(type_names(false)),
        ["upload"] => Next::Words(vec!["image"]),
        ["upload", "image"] => Next::Words(vec!["filename"]),
        ["upload", "image", "filename", ..] => Next::File,
        ["resume"] => Next::Words(vec!["segroup"]),
        [verb] if is_operation(verb) => Next::Words(UPGRADE_SCOPES.to_vec()),
        [verb, _scope, rest @ ..] if is_operation(verb) => operation_next(rest),
        _ => Next::Nothing,
    }
}

/// Inside an operation: after a keyword its value, else the keywords not given yet.
fn operation_next(rest: &[&str]) -> Next {
    let unused = || -> Vec<&'static str> {
        VALUE_KEYWORDS.iter().chain(FLAG_KEYWORDS).copied().filter(|k| !rest.contains(k)).collect()
    };
    // The keyword whose values the line is in: the last keyword, if it is still open.
    let open = rest.iter().rposition(|w| VALUE_KEYWORDS.contains(w) || FLAG_KEYWORDS.contains(w)).and_then(|i| {
        let given = rest.len() - i - 1;
        match rest[i] {
            "se_group_refs" => Some(("se_group_refs", given)),
            k if VALUE_KEYWORDS.contains(&k) && given == 0 => Some((k, 0)),
            _ => None,
        }
    });
    match open {
        Some(("se_group_refs", 0)) => Next::Names("serviceenginegroup", vec![]),
        // More groups, or the next keyword.
        Some(("se_group_refs", _)) => Next::Names("serviceenginegroup", unused()),
        Some(("action_on_error", _)) => Next::Words(ACTIONS_ON_ERROR.to_vec()),
        Some((_, _)) => Next::Names("image", vec![]),
        None => Next::Words(unused()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_follows_each_position() {
        assert!(matches!(next(&[]), Next::Words(w) if w.contains(&"upgrade") && w.contains(&"clear")));
        assert!(matches!(next(&["show"]), Next::Words(w) if w.contains(&"pool") && w.contains(&"upgrade")));
        assert_eq!(next(&["show", "pool"]), Next::Names("pool", vec![]));
        assert_eq!(next(&["delete", "image"]), Next::Names("image", vec![]));
        assert_eq!(next(&["show", "upgrade"]), Next::Words(vec!["status"]));
        assert_eq!(next(&["show", "pool", "web"]), Next::Words(vec!["server"]));
        assert_eq!(next(&["upload", "image", "filename"]), Next::File);
        assert_eq!(next(&["upgrade"]), Next::Words(vec!["system", "controller", "segroup"]));
        assert_eq!(next(&["upgrade", "segroup", "image_ref"]), Next::Names("image", vec![]));
        assert_eq!(next(&["upgrade", "segroup", "se_group_refs"]), Next::Names("serviceenginegroup", vec![]));
        let Next::Names(_, more) = next(&["upgrade", "segroup", "image_ref", "x", "se_group_refs", "g1"]) else {
            panic!()
        };
        assert!(more.contains(&"skip_warnings") && !more.contains(&"image_ref") && !more.contains(&"se_group_refs"));
        assert_eq!(next(&["upgrade", "segroup", "action_on_error"]), Next::Words(ACTIONS_ON_ERROR.to_vec()));
        let Next::Words(left) = next(&["patch", "controller", "controller_patch_ref", "p", "skip_warnings"]) else {
            panic!()
        };
        assert!(!left.contains(&"skip_warnings") && left.contains(&"se_patch_ref"));
        assert_eq!(next(&["frobnicate"]), Next::Nothing);
    }

    #[test]
    fn help_lists_commands_and_a_commands_keywords() {
        let all = help(None).unwrap();
        for v in VERBS {
            assert!(all.contains(v.word), "{}", v.word);
        }
        let upgrade = help(Some("upgrade")).unwrap();
        assert!(upgrade.contains("se_group_refs") && upgrade.contains("skip_warnings"), "{upgrade}");
        assert!(upgrade.contains("ROLLBACK_UPGRADE_OPS_ON_ERROR"), "{upgrade}");
        assert!(help(Some("show")).unwrap().contains("show pool-async status"));
        assert!(help(Some("nope")).is_err());
    }
}
