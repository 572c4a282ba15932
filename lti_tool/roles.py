"""Who teaches: the one rule for roles, used by launches, the roster sync, the class page's
access check and the schedule (LTI Core 1.3 §A.2, role vocabularies).

Moodle sends `membership#Instructor` to whoever can manage the activity, and site admins
`system/person#Administrator` plus `institution/person#Administrator` instead of Learner
(docs/moodle.md); non-editing teachers usually arrive as Learner.
"""

from __future__ import annotations

STAFF_ROLES = (
    "http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor",
    "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Administrator",
    "http://purl.imsglobal.org/vocab/lis/v2/system/person#Administrator",
    "Instructor",  # LTI Core §A.2.3.1 allows the short form of context roles
)


def is_staff(roles: list[str]) -> bool:
    """The one rule for who teaches: an instructor or administrator role (LTI Core §A.2)."""
    return any(role in STAFF_ROLES for role in roles)


# Moodle sends both to site administrators (docs/moodle.md); a course role, even
# Instructor, never makes a Labpool administrator.
ADMIN_ROLES = (
    "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Administrator",
    "http://purl.imsglobal.org/vocab/lis/v2/system/person#Administrator",
)


def is_admin(roles: list[str]) -> bool:
    """Labpool's admin page is open to a launch with an institution or system Administrator
    role (a platform's site administrator)."""
    return any(role in ADMIN_ROLES for role in roles)
