//! `fedbpt fetch`: downloads and verifies the assets.

use anyhow::{Context, Result};

use fedbpt::assets;

use crate::output::say;

pub fn fetch(names: &[String]) -> Result<()> {
    let root = assets::home();
    let wanted: Vec<&assets::AssetSpec> = if names.is_empty() {
        assets::ASSETS.iter().collect()
    } else {
        names
            .iter()
            .map(|n| {
                assets::spec(n).with_context(|| {
                    let known: Vec<&str> = assets::ASSETS.iter().map(|a| a.name).collect();
                    format!("unknown asset `{n}` (known: {})", known.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    for spec in wanted {
        let dir = assets::ensure(&root, spec, &mut |m| say(m))?;
        println!("{}\t{}", spec.name, dir.display());
    }
    Ok(())
}
