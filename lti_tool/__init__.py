"""The web edge: LTI endpoints, pages for students, teachers and admins, and the CLI."""
