//! Packages: the two kinds IoTDA upgrades.

use serde::{Deserialize, Serialize};

use crate::ValidationError;
use crate::device::wire_enum;

wire_enum!(
    /// What a package upgrades (`package_type`).
    PackageType, "package_type" {
        /// Application software (SOTA; PCP for LwM2M devices).
        Software = "softwarePackage",
        /// Firmware (FOTA; Object 5 for LwM2M devices).
        Firmware = "firmwarePackage",
    }
);

/// The PCP segment size bounds (bytes) and default.
pub const SEGMENT_SIZE_RANGE: std::ops::RangeInclusive<u16> = 32..=500;
/// The PCP segment size used when none is given.
pub const DEFAULT_SEGMENT_SIZE: u16 = 500;
