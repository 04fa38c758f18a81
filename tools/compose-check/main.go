// compose-check loads a Compose file with compose-go, the loader `docker compose` itself uses:
// it validates the file against the Compose specification, resolves anchors, merges and
// interpolation, and prints the services it defines, one per line: profiles, whether it has a
// health check, its fixed container name, its published host ports and the host addresses its
// ports bind (empty: every address of the host).
//
//	go run ./compose-check ../docker-compose.yml
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: compose-check <docker-compose.yml>")
		os.Exit(2)
	}
	path, err := filepath.Abs(os.Args[1])
	if err != nil {
		fail(err)
	}
	opts, err := cli.NewProjectOptions(
		[]string{path},
		cli.WithWorkingDirectory(filepath.Dir(path)),
		cli.WithOsEnv,
		cli.WithProfiles([]string{"*"}), // every profile, so optional services are checked too
	)
	if err != nil {
		fail(err)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	names := make([]string, 0, len(project.Services))
	for name := range project.Services {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		s := project.Services[name]
		published := []string{}
		hosts := []string{}
		for _, p := range s.Ports {
			if p.Published != "" {
				published = append(published, p.Published)
			}
			hosts = append(hosts, fmt.Sprintf("%q", p.HostIP))
		}
		fmt.Printf("%s\tprofiles=%v\thealthcheck=%t\tcontainer_name=%q\tpublished=%v\thost_ip=%v\n",
			name, s.Profiles, s.HealthCheck != nil && !s.HealthCheck.Disable, s.ContainerName, published, hosts)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "compose-check:", err)
	os.Exit(1)
}
