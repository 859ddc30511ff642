from twisted.application.service import ServiceMaker

pulumid = ServiceMaker(
    "pulumid",
    "pulumid.tap",
    "A self-hosted, Pulumi Cloud-compatible state backend",
    "pulumid",
)
