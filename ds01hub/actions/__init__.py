"""What a user may do, one implementation for every door (the users' commands through the broker,
the browser and the notebook through the hub and the ds01 service): container operations, image
builds, projects."""
